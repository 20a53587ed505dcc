"""Accuracies with their uncertainty, from per-question answers (an ``answer_frame``).

* :func:`accuracy_table`: accuracy per question type and overall, each with its ``n`` and an
  interval (Wilson for 0/1 outcomes, the percentile bootstrap for graded scores);
* :func:`paired_table`: the difference between two runs on the same questions (original vs
  pruned), per type and overall, with a paired bootstrap interval and the exact McNemar p-value.

Both return ``pandas.DataFrame`` rows, the ``overall`` row last, so the report and notebooks show
the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from probes.uncertainty import LEVEL, RESAMPLES, SEED, bootstrap_interval, paired_difference, wilson_interval

__all__ = ["ACCURACY_COLUMNS", "PAIRED_COLUMNS", "accuracy_table", "has_paired_outcomes", "paired_difference",
           "paired_table"]

ACCURACY_COLUMNS = ("qtype", "n", "correct", "accuracy", "low", "high", "level", "method")
PAIRED_COLUMNS = ("qtype", "n", "original", "pruned", "difference", "low", "high", "only_original",
                  "only_pruned", "mcnemar_p", "resolved", "level")


def _outcomes(frame: pd.DataFrame, column: str) -> np.ndarray:
    if column not in frame.columns:
        raise ValueError(f"the answers have no {column!r} column (they have {list(frame.columns)}); make them with "
                         "analyses.evaluating.evaluate.answer_frame")
    values = frame[column]
    if values.dtype == object:  # "True"/"False" read back from a CSV with keep_default_na=False
        values = values.map(lambda v: {"True": True, "False": False}.get(v, v) if isinstance(v, str) else v)
    return values.astype(float).to_numpy()


def _groups(frame: pd.DataFrame, by: str) -> list[tuple[str, np.ndarray]]:
    labels = frame[by].astype(str) if by in frame.columns else pd.Series(["all"] * len(frame), index=frame.index)
    groups = [(str(label), np.flatnonzero((labels == label).to_numpy())) for label in sorted(labels.unique())]
    return [*groups, ("overall", np.arange(len(frame)))] if len(groups) != 1 else [("overall", np.arange(len(frame)))]


def accuracy_table(frame: pd.DataFrame, column: str | None = None, by: str = "qtype", level: float = LEVEL,
                   resamples: int = RESAMPLES, seed: int = SEED) -> pd.DataFrame:
    """Accuracy of ``frame[column]`` (``score`` when present, else ``correct``) per ``by`` and overall.

    ``frame``: one row per question. Returns :data:`ACCURACY_COLUMNS`: ``n`` questions,
    ``correct`` (their summed score), ``accuracy``, the interval ``low``/``high`` at ``level``,
    and its ``method`` (Wilson when every score is 0 or 1, else the percentile bootstrap).
    """
    if frame.empty:
        raise ValueError("no answers to score; pass a frame with one row per question")
    column = column or ("score" if "score" in frame.columns else "correct")
    values = _outcomes(frame, column)
    binary = bool(np.isin(values, (0.0, 1.0)).all())
    rows = []
    for label, rows_of in _groups(frame, by):
        chosen = values[rows_of]
        if binary:
            low, high = wilson_interval(int(chosen.sum()), len(chosen), level)
        else:
            low, high = (float(v) for v in bootstrap_interval(chosen, level, resamples, seed))
        rows.append({"qtype": label, "n": len(chosen), "correct": float(chosen.sum()), "accuracy": float(chosen.mean()),
                     "low": low, "high": high, "level": level,
                     "method": "Wilson score" if binary else "percentile bootstrap over questions"})
    return pd.DataFrame(rows, columns=list(ACCURACY_COLUMNS))


def paired_table(frame: pd.DataFrame, original: str = "correct", pruned: str = "pruned_correct", by: str = "qtype",
                 level: float = LEVEL, resamples: int = RESAMPLES, seed: int = SEED) -> pd.DataFrame:
    """``pruned`` minus ``original`` accuracy on the same questions, per ``by`` and overall.

    ``frame``: one row per question with both outcome columns (the demo's answers). Returns
    :data:`PAIRED_COLUMNS`: the two accuracies, their ``difference`` (0..1 scale) with a paired
    bootstrap interval, the questions only one side got right, the exact McNemar p-value, and
    ``resolved`` (the interval excludes 0).
    """
    a, b = _outcomes(frame, original), _outcomes(frame, pruned)
    rows = []
    for label, rows_of in _groups(frame, by):
        result = paired_difference(a[rows_of], b[rows_of], level, resamples, seed)
        rows.append({"qtype": label, "n": result.n, "original": float(a[rows_of].mean()),
                     "pruned": float(b[rows_of].mean()), "difference": result.difference, "low": result.low,
                     "high": result.high, "only_original": result.only_a, "only_pruned": result.only_b,
                     "mcnemar_p": result.mcnemar_p, "resolved": result.resolved, "level": level})
    return pd.DataFrame(rows, columns=list(PAIRED_COLUMNS))


def has_paired_outcomes(frame: pd.DataFrame | None, columns: Sequence[str] = ("correct", "pruned_correct")) -> bool:
    """True when ``frame`` holds per-question outcomes of both runs (what :func:`paired_table` reads)."""
    return frame is not None and not frame.empty and all(c in frame.columns for c in columns)
