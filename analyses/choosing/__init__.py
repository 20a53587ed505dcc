"""Choosing plans: policies over probe results, accuracy-checked comparisons, held-out discipline."""
