"""Evaluating on data sets: batched answers and metrics, public benchmark loaders, accuracy
intervals and the lmms-eval model plugin."""
