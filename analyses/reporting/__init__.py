"""Reporting: the redundancy report folder (Jinja2 templates), its figures and the checked claims."""
