"""The claims a report checks, decided from the policy comparison with intervals, not point estimates.

Two claims, each judged from an ``analyses.choosing.compare.compare_policies`` frame:

* **policy order**: at equal ``k`` (equal FLOPs), LC-chosen layers keep at least the accuracy of
  cosine-chosen ones, and those at least that of random ones;
* **text vs visual**: freezing the text tokens of the LC-chosen layers costs "far more" than
  freezing their visual tokens: at least :data:`FAR_MORE_FACTOR` times the drop, and
  :data:`FAR_MORE_POINTS` more.

Each difference gets an interval at ``level``. With per-question ``outcomes`` (same questions for
every policy, as ``compare_policies`` measures them) the interval is a paired bootstrap over
questions (random policies: the per-question mean over seeds); with only ``n`` it is Newcombe's
interval for independent proportions. A claim **holds** when every interval is on its side of
the threshold, **does not hold** when one is entirely on the wrong side, and is **not resolved at
this n** otherwise (an interval contains the threshold: more questions would decide it). A frame
without ``n`` (written before intervals existed) is judged on point estimates, and says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from probes.uncertainty import LEVEL, RESAMPLES, SEED, bootstrap_interval, newcombe_interval, paired_difference

from analyses.choosing.compare import mean_outcomes

ORDER_CLAIM = "LC-chosen layers ≥ cosine-chosen ≥ random layers in accuracy at equal FLOPs"
TEXT_CLAIM = "freezing text tokens in the same layers costs far more accuracy than freezing visual tokens"
FAR_MORE_FACTOR = 2.0
FAR_MORE_POINTS = 0.05
""""Far more": the mean accuracy drop from freezing text is at least this factor times, and this many
accuracy points (0..1) above, the mean drop from freezing visual tokens in the same layers."""
HOLDS, FAILS, UNRESOLVED, PARTLY, NOT_MEASURED = (
    "holds", "does not hold", "not resolved at this n", "partly holds", "not measured")
VERDICTS = (HOLDS, PARTLY, UNRESOLVED, FAILS, NOT_MEASURED)
PAIRED, INDEPENDENT, POINT = ("paired bootstrap over questions", "Newcombe interval (independent proportions)",
                              "point estimates (the comparison has no n, so no interval)")
_TIE = 1e-9


def _points(value: float) -> str:
    return f"{100 * value:.1f} points"


def _signed(value: float) -> str:
    return f"{100 * value:+.1f}"


def _policy_accuracy(comparison: pd.DataFrame) -> pd.DataFrame:
    """Mean accuracy (over seeds) and FLOPs ratio per ``[k, policy]``."""
    return comparison.groupby(["k", "policy"]).agg(accuracy=("accuracy", "mean"), flops_ratio=("flops_ratio", "mean"))


def _evidence(comparison: pd.DataFrame) -> str:
    if "outcomes" in comparison.columns:
        texts = comparison.outcomes
        if texts.map(lambda t: isinstance(t, str) and len(t) > 0).all() and texts.str.len().nunique() == 1:
            return PAIRED
    if "n" in comparison.columns and pd.to_numeric(comparison.n, errors="coerce").gt(0).all():
        return INDEPENDENT
    return POINT


class _Sides:
    """Per-(policy, k) outcomes or pooled counts of one comparison frame."""

    def __init__(self, comparison: pd.DataFrame, evidence: str) -> None:
        self.frame, self.evidence = comparison, evidence

    def rows(self, policy: str, k: int | None = None) -> pd.DataFrame:
        rows = self.frame[self.frame.policy == policy]
        return rows if k is None else rows[rows.k == k]

    def vector(self, policy: str, k: int | None = None) -> np.ndarray:
        """Per-question outcome ``[question]``, averaged over the rows (seeds) of ``policy`` at ``k``."""
        return mean_outcomes(self.rows(policy, k))

    def pooled(self, policy: str, ks: Sequence[int] | None = None) -> tuple[int, int]:
        """``(correct, n)`` summed over the rows of ``policy`` (at ``ks``, every row when None)."""
        rows = self.rows(policy)
        if ks is not None:
            rows = rows[rows.k.isin(list(ks))]
        n = pd.to_numeric(rows.n).astype(int)
        correct = (pd.to_numeric(rows.correct) if "correct" in rows.columns else (rows.accuracy * n).round())
        return int(correct.astype(int).sum()), int(n.sum())

    def n(self) -> int | None:
        if self.evidence == PAIRED:
            return len(str(self.frame.outcomes.iloc[0]))
        if self.evidence == INDEPENDENT:
            return int(pd.to_numeric(self.frame.n).max())
        return None

    def difference(self, a: str, b: str, k: int, level: float, resamples: int, seed: int) -> dict:
        """Accuracy of ``a`` minus ``b`` at ``k``, with its interval."""
        if self.evidence == PAIRED:
            result = paired_difference(self.vector(b, k), self.vector(a, k), level, resamples, seed)
            return {"difference": result.difference, "low": result.low, "high": result.high}
        (sa, na), (sb, nb) = self.pooled(a, [k]), self.pooled(b, [k])
        low, high = newcombe_interval(sa, na, sb, nb, level)
        return {"difference": sa / na - sb / nb, "low": low, "high": high}


def _side_verdict(intervals: Sequence[dict], threshold: float = 0.0) -> str:
    """Holds when every interval's low end is above ``threshold`` or the interval is exactly the
    threshold (identical outcomes on every question: a tie, which "≥" allows), fails when one's high
    end is below it, and is not resolved otherwise."""
    if any(d["high"] < threshold for d in intervals):
        return FAILS
    if all(d["low"] > threshold or d["low"] == d["high"] == threshold for d in intervals):
        return HOLDS
    return UNRESOLVED


def _overall(verdicts: Sequence[str]) -> str:
    if all(v == HOLDS for v in verdicts):
        return HOLDS
    if FAILS in verdicts:
        return PARTLY if HOLDS in verdicts else FAILS
    return UNRESOLVED


def _with_interval(name: str, d: dict) -> str:
    return f"{name} {_signed(d['difference'])} points [{_signed(d['low'])}, {_signed(d['high'])}]"


def _order_claim(comparison: pd.DataFrame, accuracy: pd.DataFrame, flops: pd.DataFrame, sides: _Sides,
                 level: float, resamples: int, seed: int) -> dict:
    order = {"claim": ORDER_CLAIM, "verdict": NOT_MEASURED, "per_k": [], "evidence": sides.evidence, "level": level,
             "n": sides.n()}
    needed = ["shortv", "cosine", "random"]
    missing = [p for p in needed if p not in accuracy.columns]
    if missing:
        order["statement"] = f"The comparison has no {', '.join(missing)} rows."
        return order
    for k, row in accuracy[needed].dropna().iterrows():
        record = {"k": int(k), "flops_ratio": float(flops.loc[k, "shortv"]), "shortv": row.shortv,
                  "cosine": row.cosine, "random": row.random}
        if sides.evidence == POINT:
            held = row.shortv >= row.cosine - _TIE and row.cosine >= row.random - _TIE
            record["verdict"] = HOLDS if held else FAILS
        else:
            record["lc_minus_cosine"] = sides.difference("shortv", "cosine", int(k), level, resamples, seed)
            record["cosine_minus_random"] = sides.difference("cosine", "random", int(k), level, resamples, seed)
            record["verdict"] = _side_verdict([record["lc_minus_cosine"], record["cosine_minus_random"]])
        record["holds"] = record["verdict"] == HOLDS
        order["per_k"].append(record)
    if not order["per_k"]:
        order["statement"] = "No k has all of shortv, cosine and random rows."
        return order
    verdicts = [r["verdict"] for r in order["per_k"]]
    order["verdict"] = _overall(verdicts)
    ks = ", ".join(str(r["k"]) for r in order["per_k"])

    def detail(r: dict) -> str:
        text = f"k={r['k']}: LC {r['shortv']:.1%}, cosine {r['cosine']:.1%}, random {r['random']:.1%}"
        if "lc_minus_cosine" in r:
            text += (f" ({_with_interval('LC − cosine', r['lc_minus_cosine'])}, "
                     f"{_with_interval('cosine − random', r['cosine_minus_random'])})")
        return text

    if sides.evidence == POINT:
        failed = [r for r in order["per_k"] if r["verdict"] == FAILS]
        order["statement"] = (
            f"At every k compared ({ks}) the LC-chosen layers kept at least the accuracy of the cosine-chosen "
            "layers, and those at least that of random layers (mean over seeds)." if not failed else
            f"The order fails at {len(failed)} of {len(order['per_k'])} k compared "
            f"({'; '.join(detail(r) for r in failed)}).") + f" Judged on {POINT}."
        return order
    where = f"{order['n']} questions, {level:.0%} intervals, {sides.evidence}"
    held = [str(r["k"]) for r in order["per_k"] if r["verdict"] == HOLDS]
    if order["verdict"] == HOLDS:
        order["statement"] = (f"At every k compared ({ks}) LC-chosen > cosine-chosen > random with both "
                              f"differences' intervals above 0 ({where}).")
    else:
        shown = [r for r in order["per_k"] if r["verdict"] != HOLDS]
        order["statement"] = (f"{order['verdict'].capitalize()} ({where}): "
                              + (f"the order is resolved at k = {', '.join(held)}; " if held else "")
                              + "; ".join(f"{detail(r)}: {r['verdict']}" for r in shown) + ".")
    return order


def _text_claim(comparison: pd.DataFrame, accuracy: pd.DataFrame, original_accuracy: float | None, sides: _Sides,
                level: float, resamples: int, seed: int) -> dict:
    text = {"claim": TEXT_CLAIM, "verdict": NOT_MEASURED, "per_k": [], "evidence": sides.evidence, "level": level,
            "n": sides.n()}
    if "text" not in accuracy.columns or "shortv" not in accuracy.columns or original_accuracy is None:
        lacking = [p for p in ("shortv", "text") if p not in accuracy.columns]
        text["statement"] = (f"The comparison has no {', '.join(lacking)} rows." if lacking
                             else "There is no original accuracy (an 'original' row or the original score).")
        return text
    rows = accuracy[["shortv", "text"]].dropna()
    for k, row in rows.iterrows():
        text["per_k"].append({"k": int(k), "visual_drop": original_accuracy - row.shortv,
                              "text_drop": original_accuracy - row.text})
    if not text["per_k"]:
        text["statement"] = "No k has both shortv and text rows."
        return text
    ks = [r["k"] for r in text["per_k"]]
    visual_drop = float(np.mean([r["visual_drop"] for r in text["per_k"]]))
    text_drop = float(np.mean([r["text_drop"] for r in text["per_k"]]))
    margin = {"difference": text_drop - visual_drop, "low": text_drop - visual_drop, "high": text_drop - visual_drop}
    factor = text_drop - FAR_MORE_FACTOR * visual_drop
    factor_margin = {"difference": factor, "low": factor, "high": factor}
    evidence = POINT
    if sides.evidence == PAIRED and len(sides.rows("original")) > 0:
        evidence = PAIRED
        original = sides.vector("original")
        shortv = np.stack([sides.vector("shortv", k) for k in ks])
        frozen_text = np.stack([sides.vector("text", k) for k in ks])
        margins = np.column_stack([(shortv - frozen_text).mean(0),
                                   ((original - frozen_text) - FAR_MORE_FACTOR * (original - shortv)).mean(0)])
        low, high = bootstrap_interval(margins, level, resamples, seed)
        margin.update(low=float(low[0]), high=float(high[0]))
        factor_margin.update(low=float(low[1]), high=float(high[1]))
    elif sides.evidence in (PAIRED, INDEPENDENT) and "n" in comparison.columns:
        evidence = INDEPENDENT
        (ss, ns), (st, nt) = sides.pooled("shortv", ks), sides.pooled("text", ks)
        margin["low"], margin["high"] = newcombe_interval(ss, ns, st, nt, level)
    text.update(visual_drop=visual_drop, text_drop=text_drop, margin=margin, factor_margin=factor_margin,
                evidence=evidence)
    if evidence == POINT:
        holds = text_drop >= FAR_MORE_FACTOR * visual_drop and text_drop - visual_drop >= FAR_MORE_POINTS
        text["verdict"] = HOLDS if holds else FAILS
    else:
        points_verdict = _side_verdict([margin], FAR_MORE_POINTS)
        factor_verdict = _side_verdict([factor_margin], -_TIE if factor_margin["low"] == factor_margin["high"] else 0)
        text["verdict"] = (FAILS if FAILS in (points_verdict, factor_verdict) else
                           HOLDS if points_verdict == factor_verdict == HOLDS else UNRESOLVED)
    statement = (f"In the LC-chosen layers (k = {', '.join(map(str, ks))}), freezing text tokens cost "
                 f"{_points(text_drop)} of accuracy on average, freezing visual tokens {_points(visual_drop)} "
                 f"(from {original_accuracy:.1%}; \"far more\" means at least {FAR_MORE_FACTOR:g}× and "
                 f"{_points(FAR_MORE_POINTS)} more).")
    if evidence == POINT:
        statement += f" Judged on {POINT}."
    else:
        statement += (f" The difference is {_with_interval('', margin).strip()} ({text['n']} questions, "
                      f"{level:.0%} interval, {evidence}); {text['verdict']}.")
    text["statement"] = statement
    return text


def check_claims(comparison: pd.DataFrame | None, original_accuracy: float | None = None, level: float = LEVEL,
                 resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, dict]:
    """Verdicts of the two claims (see the module docstring) from the measured ``comparison`` frame.

    ``comparison``: one row per (policy, k, seed) with ``accuracy`` and ``flops_ratio``, and
    ``n``/``correct`` or per-question ``outcomes`` for intervals. Returns ``{"policy_order": ...,
    "text_vs_visual": ...}``, each with ``claim``, ``verdict`` (one of :data:`VERDICTS`),
    ``statement`` (plain sentences with the numbers and intervals), ``per_k`` (records per
    compared ``k``, with their interval and verdict), ``evidence`` (how the intervals were made),
    ``level`` and ``n``. ``original_accuracy`` is used when the frame has no ``original`` row.
    """
    if comparison is None or comparison.empty:
        empty = {"verdict": NOT_MEASURED, "per_k": [], "statement": "No policy comparison was given.",
                 "evidence": None, "level": level, "n": None}
        return {"policy_order": {"claim": ORDER_CLAIM, **empty}, "text_vs_visual": {"claim": TEXT_CLAIM, **empty}}
    sides = _Sides(comparison, _evidence(comparison))
    table = _policy_accuracy(comparison)
    accuracy = table.accuracy.unstack("policy")
    flops = table.flops_ratio.unstack("policy")
    original_rows = comparison[comparison.policy == "original"]
    if len(original_rows):
        original_accuracy = float(original_rows.accuracy.mean())
    if original_accuracy is not None and math.isnan(original_accuracy):
        original_accuracy = None
    return {"policy_order": _order_claim(comparison, accuracy, flops, sides, level, resamples, seed),
            "text_vs_visual": _text_claim(comparison, accuracy, original_accuracy, sides, level, resamples, seed)}
