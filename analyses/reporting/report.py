"""The redundancy report: one folder a person opens.

``write_report(inputs, out)`` writes ``out/``:

* ``index.html``: self-contained (figures embedded as data URIs, inline CSS, no scripts, no network);
* ``report.md``: its Markdown twin, pointing at ``figures/*.png``;
* ``figures/``: seaborn PNGs (Layer Contribution, plan strip, accuracy vs FLOPs, mode contributions,
  attention statistics);
* the data: ``lc.nc`` (and ``attention.nc``, ``mode_contribution.nc``), ``plan.json``,
  ``comparison.csv``, ``latency.csv``, ``answers.csv`` where given, and ``summary.json`` with
  the headline figures and the verdicts of the checked claims.

The folder is built next to ``out`` and renamed into place, so a crash never leaves half a report.
Text from data sets and attrs is escaped in both the HTML and the Markdown.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

import probes
from probes import uncertainty
from eemllm_models import EfficiencyPlan
from eemllm_models.files import atomic_write, atomic_write_dir, atomic_write_text

from analyses.reporting import plots
from analyses.reporting import page
from analyses.choosing.compare import random_seeds_label
from analyses.evaluating.accuracy import accuracy_table, has_paired_outcomes, paired_table
from analyses.reporting.claims import (FAR_MORE_FACTOR, FAR_MORE_POINTS, ORDER_CLAIM, TEXT_CLAIM, _points,
                                       _policy_accuracy, check_claims)

PROBE_FILES = {"lc": "lc.nc", "attention": "attention.nc", "modes": "mode_contribution.nc"}
"""Report input name -> file name (as ``eemllm probe`` writes them)."""
PROBE_CONTENTS: dict[str, tuple[str, dict[str, tuple[str, ...]]]] = {
    "lc": ("layer_contribution", {"lc": ("sample", "layer", "group"), "cosine": ("sample", "layer", "group")}),
    "attention": ("attention_statistics", {**{name: ("sample", "layer", "head") for name in probes.HEAD_STATISTICS},
                                           "entropy": ("sample", "layer", "head", "query_group")}),
    "modes": ("mode_contribution", {"contribution": ("sample", "layer", "mode")}),
}
"""Report input name -> (probe attr, {variable: dims}) a complete probe result has."""
MAY_BE_NAN = {"attention": {"visual_to_visual", "visual_to_text", "entropy"}}
"""Variables that are NaN by design in some layers: the visual-query statistics of a ``frozen``
layer, which forms no visual queries (attention statistics of a planned model)."""
ANSWER_ROWS = 40
"""Per-sample answers shown in the page (all of them are in ``answers.csv``)."""


def _regenerate(name: str) -> str:
    return f"regenerate it with `eemllm probe --probes {name} --out DIR`"


def check_probe_result(result: xr.Dataset, name: str, source: str | None = None) -> None:
    """Raise ``ValueError`` unless ``result`` is a complete ``name`` probe result (``name`` in
    :data:`PROBE_FILES`): the right ``probe`` attr, every variable with its dims, samples, no NaN."""
    probe, variables = PROBE_CONTENTS[name]
    where = source or f"the {name} dataset"
    found = result.attrs.get("probe")
    if found != probe:
        raise ValueError(f"{where} holds a {found or 'non-probe'!r} result, not {probe}; {_regenerate(name)}")
    for variable, dims in variables.items():
        if variable not in result.data_vars:
            raise ValueError(f"{where} is incomplete: it has no {variable!r} variable (it has "
                             f"{sorted(result.data_vars)}); {_regenerate(name)}")
        if result[variable].dims != dims:
            raise ValueError(f"{where} is incomplete: {variable!r} has dims {result[variable].dims}, expected "
                             f"{dims}; {_regenerate(name)}")
        if variable not in MAY_BE_NAN.get(name, ()) and np.isnan(result[variable].values).any():
            raise ValueError(f"{where} is incomplete: {variable!r} holds NaN values; {_regenerate(name)}")
    if result.sizes["sample"] == 0:
        raise ValueError(f"{where} holds no samples; {_regenerate(name)}")
    if name == "lc" and not {"visual", "text"} <= {str(g) for g in result.group.values}:
        raise ValueError(f"{where} is incomplete: its group coordinate is {list(result.group.values)}, expected "
                         f"visual and text; {_regenerate(name)}")


METHOD_COLUMNS = ("method", "plan", "target", "flops_ratio", "n", "accuracy", "accuracy_low", "accuracy_high",
                  "difference", "difference_low", "difference_high", "prefill_speedup", "ideal_prefill_speedup",
                  "decode_speedup", "kv_cache_bytes", "noisy")
"""Columns a ``methods`` frame needs (what :func:`analyses.choosing.methods.method_table` returns)."""
FLOPS_KEYS = ("decoder_flops_ratio", "decoder_flops_original", "decoder_flops_pruned", "prefill_flops_ratio",
              "prefill_flops_original", "prefill_flops_pruned", "text_tokens", "visual_tokens")
"""The FLOPs figures a report shows (``analyses.measuring.flops.flops_figures``)."""


@dataclass
class ReportInputs:
    """Everything a report shows; only ``lc`` and ``plan`` are required.

    ``lc``/``attention``/``modes``: results of ``probes.layer_contribution`` / ``attention_statistics`` /
    ``mode_contribution``. ``comparison``: one row per measured plan, columns ``policy``, ``k``,
    ``flops_ratio``, ``accuracy`` (``analyses.choosing.compare.compare_policies``; an ``original`` row at k 0,
    and a ``text`` policy for the frozen-text control). ``latency``: one row per ``variant`` with
    ``prefill_ms``, ``prefill_speedup``, ... (every column present is shown). ``scores``:
    ``{"original": scores, "pruned": scores}`` of ``analyses.evaluating.evaluate.scores``. ``answers``:
    per-sample outputs (``id``, ``qtype``, ``question``, ``answer``, ``prediction``,
    ``pruned_prediction``, ...). ``flops``: headline FLOPs figures (``decoder_flops_ratio``, ...).
    ``pruned_model``: the saved pruned model's folder. ``sources``: input name -> file it was read from.
    ``evaluation``: what ``scores`` and ``answers`` were measured on (``dataset``, ``split``, ``n``,
    as :func:`analyses.choosing.heldout.describe` gives it), shown next to every accuracy. ``methods``: layer-level
    against token-level methods at equal FLOPs, one row per ``method``
    (:func:`analyses.choosing.methods.method_table`).
    """

    lc: xr.Dataset
    plan: EfficiencyPlan
    attention: xr.Dataset | None = None
    modes: xr.Dataset | None = None
    comparison: pd.DataFrame | None = None
    latency: pd.DataFrame | None = None
    scores: Mapping[str, Mapping[str, float]] | None = None
    answers: pd.DataFrame | None = None
    flops: Mapping[str, float] | None = None
    pruned_model: Path | None = None
    title: str | None = None
    sources: dict[str, str] = field(default_factory=dict)
    evaluation: Mapping[str, Any] | None = None
    methods: pd.DataFrame | None = None

    def __post_init__(self) -> None:
        for name in PROBE_FILES:
            result = getattr(self, name)
            if result is not None:
                check_probe_result(result, name, self.sources.get(name))
        self.lc = _ensure_intervals(self.lc, "lc")
        if self.modes is not None:
            self.modes = _ensure_intervals(self.modes, "contribution")
        n_layers = self.lc.sizes["layer"]
        self.plan.check_layers(n_layers, f"the Layer Contribution result ({self.lc.attrs.get('model', '?')})")
        for name in ("attention", "modes"):
            result = getattr(self, name)
            if result is not None and (result.sizes["layer"], result.attrs.get("model")) != (
                    n_layers, self.lc.attrs.get("model")):
                raise ValueError(f"the {name} result was measured on {result.attrs.get('model')!r} "
                                 f"({result.sizes['layer']} layers), the Layer Contribution on "
                                 f"{self.lc.attrs.get('model')!r} ({n_layers} layers); probe one model")
        if self.comparison is not None:
            missing = {"policy", "k", "flops_ratio", "accuracy"} - set(self.comparison.columns)
            if missing:
                raise ValueError(f"the comparison frame lacks columns {sorted(missing)}; make it with "
                                 "analyses.choosing.compare.compare_policies")
        if self.methods is not None:
            missing = set(METHOD_COLUMNS) - set(self.methods.columns)
            if missing:
                raise ValueError(f"the methods frame lacks columns {sorted(missing)}; make it with "
                                 "analyses.choosing.methods.method_table")
        if self.scores is not None and not {"original", "pruned"} <= set(self.scores):
            raise ValueError("scores need 'original' and 'pruned' entries (analyses.evaluating.evaluate.scores of "
                             "each, e.g. "
                             f'scores.json as {{"original": {{...}}, "pruned": {{...}}}}); got {sorted(self.scores)}')
        if self.pruned_model is not None:
            self.pruned_model = Path(self.pruned_model)


# ----------------------------------------------------------------------------- reading inputs

def _open_probe(path: Path, name: str) -> xr.Dataset:
    probe = PROBE_CONTENTS[name][0]
    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} ({probe}) at {path}; make it with "
                                f"`eemllm probe --probes {name} --out {path.parent}`")
    try:
        result = probes.open_result(path, probe=probe)
    except probes.ResultMismatch:
        raise
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path} is not a readable probe result (half-written or corrupt: {err}); "
                         f"{_regenerate(name)}") from err
    check_probe_result(result, name, str(path))
    return result


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); write it again") from err


def load_report_inputs(
    folder: str | os.PathLike,
    plan: str | os.PathLike | None = None,
    comparison: str | os.PathLike | None = None,
    latency: str | os.PathLike | None = None,
    scores: str | os.PathLike | None = None,
    answers: str | os.PathLike | None = None,
    flops: str | os.PathLike | None = None,
    pruned_model: str | os.PathLike | None = None,
) -> ReportInputs:
    """Read a report's inputs from ``folder`` (what ``eemllm probe``/``demo`` write), paths overriding.

    ``folder`` must hold ``lc.nc``; ``attention.nc`` and ``mode_contribution.nc`` are used when
    present. Defaults inside ``folder``: ``plan.json``; ``comparison.csv``; ``latency.csv``;
    ``scores.json`` (``{"original": ..., "pruned": ...}``, or ``demo_summary.json``'s accuracies);
    ``answers.csv`` or ``demo_answers.csv``; ``flops.json`` (or ``demo_summary.json``'s
    ``decoder_flops_ratio``); ``pruned-model/``. Raises ``FileNotFoundError``/``ValueError`` naming
    the file and how to make it when a required file is missing or a probe file is incomplete.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no probe folder {folder}; make it with `eemllm probe --out {folder}`")
    sources: dict[str, str] = {}
    results: dict[str, xr.Dataset | None] = {}
    for name, filename in PROBE_FILES.items():
        path = folder / filename
        results[name] = _open_probe(path, name) if name == "lc" or path.is_file() else None
        if results[name] is not None:
            sources[name] = str(path)

    def pick(given, *names: str) -> Path | None:
        if given is not None:
            if not Path(given).exists():
                raise FileNotFoundError(f"{given} does not exist; check the path")
            return Path(given)
        return next((folder / n for n in names if (folder / n).exists()), None)

    plan_path = pick(plan, "plan.json")
    if plan_path is None:
        raise FileNotFoundError(f"no plan.json in {folder}; make one with `eemllm plan --lc {folder / 'lc.nc'} "
                                "--k K --out plan.json` and pass --plan")
    try:
        loaded_plan = EfficiencyPlan.from_dict(_read_json(plan_path))
    except ValueError as err:
        raise ValueError(f"{plan_path} is not an EfficiencyPlan: {err}") from err
    sources["plan"] = str(plan_path)
    demo = _read_json(folder / "demo_summary.json") if (folder / "demo_summary.json").is_file() else {}
    frames: dict[str, pd.DataFrame | None] = {}
    for name, given, defaults, text in (("comparison", comparison, ("comparison.csv",), False),
                                        ("latency", latency, ("latency.csv",), False),
                                        ("methods", None, ("methods.csv",), False),
                                        ("answers", answers, ("answers.csv", "demo_answers.csv"), True)):
        path = pick(given, *defaults)
        frames[name] = None if path is None else pd.read_csv(path, keep_default_na=not text)
        if path is not None:
            sources[name] = str(path)
    scores_path = pick(scores, "scores.json")
    loaded_scores = _read_json(scores_path) if scores_path is not None else (
        {"original": demo["accuracy"], "pruned": demo["pruned_accuracy"]} if "pruned_accuracy" in demo else None)
    flops_path = pick(flops, "flops.json")
    loaded_flops = _read_json(flops_path) if flops_path is not None else (
        {k: v for k, v in demo.items() if k in FLOPS_KEYS} if "decoder_flops_ratio" in demo else None)
    return ReportInputs(lc=results["lc"], plan=loaded_plan, attention=results["attention"], modes=results["modes"],
                        comparison=frames["comparison"], latency=frames["latency"], scores=loaded_scores,
                        answers=frames["answers"], flops=loaded_flops, pruned_model=pick(pruned_model, "pruned-model"),
                        sources=sources, evaluation=demo.get("evaluation"), methods=frames["methods"])


# ----------------------------------------------------------------------------- measured claims

# check_claims, ORDER_CLAIM, TEXT_CLAIM and the "far more" thresholds live in analyses.reporting.claims (decided
# from intervals) and are re-exported here.
__all__ = ["FAR_MORE_FACTOR", "FAR_MORE_POINTS", "ORDER_CLAIM", "TEXT_CLAIM", "ReportInputs", "check_claims",
           "check_probe_result", "load_report_inputs", "report_summary", "write_report"]


# ----------------------------------------------------------------------------- uncertainty

def _ensure_intervals(result: xr.Dataset, variable: str) -> xr.Dataset:
    """``result`` with its bootstrap interval variables (added here for files written before they existed)."""
    if f"{variable}_low" in result and f"{variable}_high" in result and "selection_stability" in result:
        return result
    return uncertainty.with_intervals(result, variable)


def _interval_settings(variable: xr.DataArray) -> dict:
    attrs = variable.attrs
    return {"level": attrs.get("interval_level", uncertainty.LEVEL),
            "method": attrs.get("interval_method", uncertainty.BOOTSTRAP_METHOD),
            "resamples": attrs.get("interval_resamples", uncertainty.RESAMPLES),
            "seed": attrs.get("interval_seed", uncertainty.SEED)}


def lc_intervals(lc: xr.Dataset) -> dict[str, Any]:
    """Mean Layer Contribution per layer and group with its bootstrap interval (``summary.json``'s ``lc``)."""
    mean = lc.lc.mean("sample")
    layers = []
    for layer in lc.layer.values:
        record: dict[str, Any] = {"layer": int(layer)}
        for group in lc.group.values:
            at = {"layer": layer, "group": group}
            record[str(group)] = float(mean.sel(at))
            record[f"{group}_low"] = float(lc.lc_low.sel(at))
            record[f"{group}_high"] = float(lc.lc_high.sel(at))
        layers.append(record)
    return {**_interval_settings(lc.lc_low), "samples": lc.sizes["sample"], "units": lc.lc.attrs.get("units"),
            "layers": layers}


def selection_stability_summary(plan: EfficiencyPlan, lc: xr.Dataset, modes: xr.Dataset | None = None
                                ) -> list[dict[str, Any]]:
    """How stable the plan's choice is under bootstrap resamples of the probe samples, per changed mode.

    For ``frozen`` layers the basis is the visual Layer Contribution, for ``naavit``/``composite``
    layers that mode's contribution (when ``modes`` is given). Each record: ``mode``, ``basis``,
    ``k`` (layers in that mode), ``layers`` (layer -> share of resamples in which it is among the
    ``k`` lowest), ``least`` (the smallest share), ``same_set`` (share of resamples whose ``k``
    lowest are exactly these layers), ``lowest_by_mean`` (whether the plan chose the ``k`` lowest
    means) and the resample settings.
    """
    records = []
    for mode in dict.fromkeys(plan.modes):
        chosen = list(plan.layers(mode))
        if mode == "full" or not chosen:
            continue
        if mode == "frozen":
            result, values, column, basis = lc, lc.lc.sel(group="visual"), {"group": "visual"}, "visual LC"
        elif modes is not None and mode in set(map(str, modes["mode"].values)):
            result, values, column = modes, modes.contribution.sel(mode=mode), {"mode": mode}
            basis = f"{mode} contribution"
        else:
            continue
        settings = _interval_settings(result.selection_stability)
        k = len(chosen)
        shares = result.selection_stability.sel(k=k, **column).values
        matrix = values.transpose("sample", "layer").values
        lowest = set(np.argsort(matrix.mean(0), kind="stable")[:k].tolist())
        records.append({"mode": mode, "basis": basis, "k": k,
                        "layers": {str(layer): float(shares[layer]) for layer in chosen},
                        "least": float(min(shares[layer] for layer in chosen)),
                        "same_set": uncertainty.set_agreement(matrix, chosen, int(settings["resamples"]),
                                                              int(settings["seed"])),
                        "lowest_by_mean": lowest == set(chosen), "samples": int(matrix.shape[0]), **settings})
    return records


def accuracy_intervals(answers: pd.DataFrame | None) -> dict[str, Any] | None:
    """Per-type and overall accuracy with ``n`` and interval, original and pruned, and their paired difference,
    from per-question answers with ``correct`` (and ``pruned_correct``) columns; None without them."""
    if answers is None or answers.empty or "correct" not in answers.columns:
        return None
    tables = {"original": accuracy_table(answers, "correct")}
    result: dict[str, Any] = {}
    if has_paired_outcomes(answers):
        tables["pruned"] = accuracy_table(answers, "pruned_correct")
        result["paired_difference"] = paired_table(answers).to_dict(orient="records")
    result.update({name: table.to_dict(orient="records") for name, table in tables.items()})
    result["level"] = float(tables["original"].level.iloc[0])
    return result


# ----------------------------------------------------------------------------- headline figures

def _latency_headline(latency: pd.DataFrame | None, plan: EfficiencyPlan) -> dict | None:
    """The pruned variant's prefill speedup: the first row named pruned, plan or the plan's policy (in that order;
    a latency table may hold other variants, such as the methods compared at equal FLOPs), else the fastest."""
    if latency is None or "prefill_speedup" not in latency.columns or "variant" not in latency.columns:
        return None
    variants = latency.variant.astype(str)
    name = next((n for n in ("pruned", "plan", str(plan.provenance.get("policy"))) if (variants == n).any()), None)
    rows = latency[variants == name] if name is not None else latency[~variants.isin(["original", "full", "baseline"])]
    if rows.empty:
        return None
    row = rows.loc[rows.prefill_speedup.astype(float).idxmax()]
    headline = {"variant": str(row.variant), "prefill_speedup": float(row.prefill_speedup),
                **({"decode_speedup": float(row.decode_speedup)} if "decode_speedup" in row else {})}
    for column in ("prefill_ms", "prefill_ms_iqr", "repeats", "prefill_speedup_low", "prefill_speedup_high",
                   "decode_speedup_low", "decode_speedup_high"):
        if column in row and pd.notna(row[column]):
            headline[column] = float(row[column])
    if "prefill_speedup_low" in headline and "prefill_speedup_high" in headline:
        headline["noisy"] = bool(headline["prefill_speedup_low"] <= 1.0 <= headline["prefill_speedup_high"])
        headline["interval_level"] = float(latency.attrs.get("interval_level", uncertainty.LEVEL))
    else:
        headline["noisy"] = None  # no interval: a latency table from before intervals (rerun eemllm latency)
    return headline


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def report_summary(inputs: ReportInputs) -> dict[str, Any]:
    """The headline figures (what ``summary.json`` holds): model, data, plan, FLOPs ratio, accuracy
    original and pruned, prefill speedup (with its interval and ``noisy`` flag), the claims' verdicts,
    and the intervals: ``lc`` (:func:`lc_intervals`), ``selection_stability``
    (:func:`selection_stability_summary`) and ``accuracy_intervals`` (:func:`accuracy_intervals`)."""
    attrs = inputs.lc.attrs
    scores = inputs.scores or {}
    original = scores.get("original", {}).get("overall")
    changed = {m: list(inputs.plan.layers(m)) for m in dict.fromkeys(inputs.plan.modes) if m != "full"}
    return _jsonable({
        "model": attrs.get("model"), "model_class": attrs.get("model_class"), "n_layers": inputs.plan.n_layers,
        "probe_dataset": attrs.get("dataset"), "probe_split": attrs.get("dataset_split"),
        "probe_samples": inputs.lc.sizes["sample"], "divergence": attrs.get("divergence"),
        "plan": {"changed_layers": changed, "provenance": dict(inputs.plan.provenance)},
        "decoder_flops_ratio": (inputs.flops or {}).get("decoder_flops_ratio"),
        "flops": dict(inputs.flops or {}),
        "accuracy": {"original": original, "pruned": scores.get("pruned", {}).get("overall")},
        "scores": {k: dict(v) for k, v in scores.items()},
        "latency": _latency_headline(inputs.latency, inputs.plan),
        "pruned_model": None if inputs.pruned_model is None else str(inputs.pruned_model),
        "claims": check_claims(inputs.comparison, original),
        "lc": lc_intervals(inputs.lc),
        "selection_stability": selection_stability_summary(inputs.plan, inputs.lc, inputs.modes),
        "accuracy_intervals": accuracy_intervals(inputs.answers),
        "methods": None if inputs.methods is None else inputs.methods.to_dict(orient="records"),
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })


# ----------------------------------------------------------------------------- page blocks

_percent = "{:.1%}".format


def _span(low: float, high: float, formatter: Callable[[float], str] = "{:.3g}".format) -> str:
    """An interval as ``[low, high]``; n/a when either end is missing."""
    if low is None or high is None or (isinstance(low, float) and math.isnan(low)) or (
            isinstance(high, float) and math.isnan(high)):
        return "n/a"
    return f"[{formatter(low)}, {formatter(high)}]"


def _signed_points(value: float) -> str:
    return f"{100 * value:+.1f}"


def _difference_text(record: Mapping[str, float]) -> str:
    """A difference of accuracies (0..1) with its interval, in points: ``+2.4 [-4.8, +9.5]``."""
    return (f"{_signed_points(record['difference'])} "
            f"{_span(record['low'], record['high'], _signed_points)}")


# ----------------------------------------------------------------------------- sections

def _flops_detail(flops: Mapping[str, float]) -> str:
    """The FLOPs card's detail: speedup, amounts per prompt (in a unit that shows them) and the prompt."""
    from analyses.measuring.flops import format_flops

    ratio = flops.get("decoder_flops_ratio")
    if ratio is None:
        return "no model config or token counts to count them from"
    parts = [f"{1 / ratio:.2f}× fewer" if ratio > 0 else ""]
    if "decoder_flops_original" in flops and "decoder_flops_pruned" in flops:
        parts.append(f"{format_flops(flops['decoder_flops_original'])} → {format_flops(flops['decoder_flops_pruned'])}"
                     " per prompt")
    if "text_tokens" in flops and "visual_tokens" in flops:
        parts.append(f"{flops['text_tokens']:.0f} text + {flops['visual_tokens']:.0f} visual tokens")
    return "; ".join(p for p in parts if p) + " (ShortV convention)"


def _headline(inputs: ReportInputs, summary: dict) -> list[page.Item]:
    plan = inputs.plan
    changed = plan.n_layers - len(plan.layers("full"))
    modes = ", ".join(f"{len(plan.layers(m))} {m}" for m in dict.fromkeys(plan.modes) if m != "full") or "none"
    ratio = summary["decoder_flops_ratio"]
    accuracy = summary["accuracy"]
    latency = summary["latency"]
    cards = [
        ("Layers changed", f"{changed} of {plan.n_layers}", modes),
        ("Decoder prefill FLOPs", "not counted" if ratio is None else f"{ratio:.0%} of original",
         _flops_detail(inputs.flops or {})),
        ("Accuracy original → pruned",
         "not measured" if accuracy["original"] is None or accuracy["pruned"] is None
         else f"{accuracy['original']:.1%} → {accuracy['pruned']:.1%}",
         "" if accuracy["original"] is None or accuracy["pruned"] is None
         else _accuracy_card_detail(accuracy, summary.get("accuracy_intervals"))),
        ("Prefill speedup", *_latency_card(latency)),
    ]
    return [page.cards(cards)]


def _accuracy_card_detail(accuracy: Mapping[str, float], intervals: Mapping[str, Any] | None) -> str:
    """The accuracy card's detail: the change in points, with its paired interval and n when the answers allow."""
    change = f"{100 * (accuracy['pruned'] - accuracy['original']):+.1f} points"
    paired = (intervals or {}).get("paired_difference")
    if not paired:
        return change + " (no per-question answers: no interval)"
    overall = paired[-1]
    return (f"{change}; paired {intervals['level']:.0%} interval "
            f"{_span(overall['low'], overall['high'], _signed_points)} points on {overall['n']} questions, "
            f"McNemar p = {overall['mcnemar_p']:.2g}" + ("" if overall["resolved"] else "; not resolved at this n"))


def _latency_card(latency: Mapping[str, Any] | None) -> tuple[str, str]:
    """The prefill card's value and detail: the median speedup, flagged noisy (its interval includes 1.0
    or its repeats spread too much, :data:`analyses.measuring.latency.NOISY_SPREAD`)."""
    if latency is None:
        return "not measured", ""
    value = f"{latency['prefill_speedup']:.2f}×"
    detail = f"variant {latency['variant']}"
    if "repeats" in latency:
        detail += f", median of {latency['repeats']:.0f} paired repeats"
    if latency.get("noisy") is None:
        return value, detail + "; no interval (a latency table from before intervals: rerun eemllm latency)"
    span = _span(latency["prefill_speedup_low"], latency["prefill_speedup_high"], "{:.2f}×".format)
    interval = f"{latency.get('interval_level', uncertainty.LEVEL):.0%} interval {span}"
    if latency["noisy"]:
        return f"{value} (noisy)", f"noisy: interval includes 1.0 or repeats spread > 10% ({interval}); {detail}"
    return value, f"{interval}; {detail}"


def _claims_section(summary: dict) -> list[page.Item]:
    claims = summary["claims"]
    blocks = [page.heading("Claims checked", "claims"), page.verdict(claims["policy_order"]),
              page.verdict(claims["text_vs_visual"])]
    if claims["policy_order"]["per_k"]:
        blocks.append(page.paragraph("Accuracy of each policy at equal k (equal FLOPs)"
                                     + (f", with the {claims['policy_order']['level']:.0%} interval of each difference "
                                    f"in points ({claims['policy_order']['evidence']}, "
                                    f"{claims['policy_order']['n']} questions):"
                                    if "lc_minus_cosine" in claims["policy_order"]["per_k"][0] else ":")))
        frame = pd.DataFrame([{key: value for key, value in r.items() if not isinstance(value, Mapping)}
                              for r in claims["policy_order"]["per_k"]]).drop(columns="holds")
        for name, key in (("LC − cosine", "lc_minus_cosine"), ("cosine − random", "cosine_minus_random")):
            if key in claims["policy_order"]["per_k"][0]:
                frame.insert(len(frame.columns) - 1, name,
                             [_difference_text(r[key]) for r in claims["policy_order"]["per_k"]])
        blocks.append(page.table(frame, {"shortv": _percent, "cosine": _percent, "random": _percent, "k": str,
                                     "flops_ratio": "{:.3f}".format}))
    if claims["text_vs_visual"]["per_k"]:
        frame = pd.DataFrame(claims["text_vs_visual"]["per_k"])
        blocks.append(page.paragraph("Accuracy lost against the original, freezing visual or text tokens in the same "
                                     "layers:"))
        blocks.append(page.table(frame, {"k": str, "visual_drop": _points, "text_drop": _points}))
    return blocks


def _plan_section(inputs: ReportInputs, figures: dict[str, bytes]) -> list[page.Item]:
    plan = inputs.plan
    blocks = [page.heading("The chosen plan", "plan"),
              page.figure(figures["plan.png"], "plan.png",
                          "Decoder layers coloured by the mode their visual tokens run in")]
    layers = [f"{m}: {', '.join(map(str, plan.layers(m)))}" for m in dict.fromkeys(plan.modes) if m != "full"]
    blocks.append(page.paragraph("; ".join(layers) if layers else "Every layer runs in full (an empty plan)."))
    if plan.provenance:
        blocks.append(page.table(pd.DataFrame({"provenance": list(plan.provenance),
                                           "value": [json.dumps(_jsonable(v)) if not isinstance(v, str) else v
                                                     for v in plan.provenance.values()]}), default=None))
    return blocks


def _stability_blocks(records: Sequence[Mapping[str, Any]]) -> list[page.Item]:
    """Selection stability of the plan's chosen layers (:func:`selection_stability_summary`)."""
    if not records:
        return []
    blocks = [page.heading("Selection stability", "stability"),
              page.paragraph("How much the plan's choice depends on which probe samples were drawn: for each chosen "
                             "layer, the share of bootstrap resamples of the samples in which it is still among the k "
                             "lowest; 'whole set' is the share in which the k lowest are exactly the chosen layers.")]
    rows = []
    for record in records:
        layers = ", ".join(f"{layer}: {share:.0%}" for layer, share in record["layers"].items())
        rows.append({"mode": record["mode"], "basis": record["basis"], "k": record["k"], "chosen layers": layers,
                     "least stable": record["least"], "whole set": record["same_set"],
                     "samples": record["samples"], "resamples": record["resamples"]})
        if not record["lowest_by_mean"]:
            blocks.append(page.paragraph(f"The {record['mode']} layers are not the {record['k']} lowest by mean "
                                         f"{record['basis']}: this plan was chosen another way."))
    blocks.append(page.table(pd.DataFrame(rows), {"k": str, "samples": str, "resamples": str, "least stable": _percent,
                                              "whole set": _percent}))
    return blocks


def _lc_section(inputs: ReportInputs, figures: dict[str, bytes],
                summary_stability: Sequence[Mapping[str, Any]] = ()) -> list[page.Item]:
    lc = inputs.lc
    mean = lc.mean("sample")
    table = pd.DataFrame({"layer": lc.layer.values, "mode": inputs.plan.modes,
                          "LC visual": mean.lc.sel(group="visual").values, "LC text": mean.lc.sel(group="text").values,
                          "cosine visual": mean.cosine.sel(group="visual").values})
    if "relative_change" in lc:
        table["relative change visual"] = mean.relative_change.sel(group="visual").values
    level = lc.lc_low.attrs.get("interval_level", uncertainty.LEVEL)
    for position, group in ((3, "visual"), (5, "text")):
        table.insert(position, f"{group} {level:.0%} interval",
                     [_span(lo, hi) for lo, hi in zip(lc.lc_low.sel(group=group).values,
                                                     lc.lc_high.sel(group=group).values)])
    frozen = len(inputs.plan.layers("frozen"))
    if frozen:
        table[f"among {frozen} lowest"] = lc.selection_stability.sel(k=frozen, group="visual").values
    below = int((table["LC visual"] < table["LC text"]).sum())
    return [page.heading("Layer Contribution", "lc"),
            page.paragraph(f"How much the output distribution moves ({lc.attrs.get('divergence', '?')} divergence "
                           f"at the {lc.attrs.get('positions', '?')} positions) when one layer's update of one token "
                           f"group is removed, over {lc.sizes['sample']} samples. Visual LC is below text LC in "
                           f"{below} of {len(table)} layers."),
            page.figure(figures["lc.png"], "lc.png", "Layer Contribution per layer and token group (mean with its "
                        f"{level:.0%} bootstrap interval over samples; log scale; values at or below {plots.FLOOR:g}, "
                        f"float noise included, are drawn at {plots.FLOOR:g})"),
            page.paragraph(f"Mean LC per layer with its {level:.0%} {_interval_settings(lc.lc_low)['method']} interval "
                           f"({_interval_settings(lc.lc_low)['resamples']} resamples, seed "
                           f"{_interval_settings(lc.lc_low)['seed']})"
                           + (f"; 'among {frozen} lowest': the share of resamples in which the layer's visual LC "
                              f"is among the {frozen} lowest (the ShortV rule's choice at k = {frozen})."
                              if frozen else ".")),
            page.table(table, {"layer": str, f"among {frozen} lowest": _percent}),
            *_stability_blocks(summary_stability)]


def _comparison_section(inputs: ReportInputs, figures: dict[str, bytes]) -> list[page.Item]:
    if inputs.comparison is None:
        return []
    comparison = inputs.comparison
    table = _policy_accuracy(comparison[comparison.policy != "original"]).reset_index()
    order = [p for p in plots.POLICY_ORDER if p in set(table.policy)] + sorted(
        set(table.policy) - set(plots.POLICY_ORDER))
    wide = table.pivot(index="k", columns="policy", values="accuracy")[order].reset_index()
    flops = table.pivot(index="k", columns="policy", values="flops_ratio")[order].reset_index()
    original = comparison[comparison.policy == "original"].accuracy
    measured = ""
    if {"split", "n"} <= set(comparison.columns):
        measured = f" Measured on {int(comparison.n.iloc[0])} questions of the {comparison.split.iloc[0]} split."
    return [page.heading("Accuracy vs FLOPs", "tradeoff"),
            page.paragraph("Each policy changes k layers; at equal k the visual-freezing policies cost the same FLOPs. "
                           "'text' freezes the text tokens instead, in the LC-chosen layers."
                           + (f" The original model scores {original.mean():.1%}." if len(original) else "")
                           + measured),
            page.figure(figures["tradeoff.png"], "tradeoff.png",
                        f"Accuracy against decoder prefill FLOPs ratio ({random_seeds_label(comparison)}, the "
                        "band its sd over seeds where there are several; chosen plan: its benchmark score at its "
                        "FLOPs ratio)"),
            page.paragraph("Accuracy per policy and k:"), page.table(wide, {"k": str}, _percent),
            page.paragraph("Decoder prefill FLOPs ratio per policy and k:"),
            page.table(flops, {"k": str}, "{:.3f}".format)]


def _methods_section(inputs: ReportInputs) -> list[page.Item]:
    """Layer-level against token-level methods at equal FLOPs (:func:`analyses.choosing.methods.method_table`)."""
    if inputs.methods is None:
        return []
    table = inputs.methods
    planned = table.method != "original"
    frame = pd.DataFrame({
        "method": table.method, "plan": table.plan, "FLOPs ratio": table.flops_ratio,
        "accuracy": table.accuracy, "interval": [_span(a, b, _percent) for a, b in
                                                 zip(table.accuracy_low, table.accuracy_high)],
        "change (points)": [_difference_text({"difference": d, "low": lo, "high": hi}) if p else "" for p, d, lo, hi
                            in zip(planned, table.difference, table.difference_low, table.difference_high)],
        "verdict": ["" if not p else "not resolved at this n" if lo <= 0 <= hi else "resolved"
                    for p, lo, hi in zip(planned, table.difference_low, table.difference_high)],
        "prefill speedup (ideal)": [f"{m:.2f}× ({i:.2f}×)" for m, i in
                                    zip(table.prefill_speedup, table.ideal_prefill_speedup)],
        "decode speedup": table.decode_speedup, "KV cache MB": table.kv_cache_bytes / 1e6,
        "noisy": [bool(v) if pd.notna(v) else False for v in table.noisy]})
    target, n = float(table.target.iloc[0]), int(table.n.iloc[0])
    return [page.heading("Layer-level vs token-level redundancy at equal FLOPs", "methods"),
            page.paragraph(f"Each method's plan is the one that reaches {target:.0%} of the original decoder prefill "
                           "FLOPs with the fewest changes (a method that cannot, shown at the most it saves): ShortV "
                           "freezing, NAAViT, composite attention, VTW withdrawal, FastV pruning and the budget mix "
                           f"of layer modes and withdrawal. Accuracy on the same {n} held-out questions with its "
                           "Wilson interval; the change is paired on those questions, with a bootstrap interval. "
                           "Speedups and the KV cache (after decoding) were measured side by side in one run, "
                           "interleaved, and are in latency.csv as well."),
            page.table(frame, {"n": str, "FLOPs ratio": "{:.3f}".format, "decode speedup": "{:.2f}×".format,
                               "KV cache MB": "{:.1f}".format}, _percent)]


def _accuracy_interval_blocks(intervals: Mapping[str, Any] | None) -> list[page.Item]:
    """Accuracy per type with n and interval, and the paired original-vs-pruned difference."""
    if intervals is None:
        return []
    level = intervals["level"]
    original = pd.DataFrame(intervals["original"])
    frame = pd.DataFrame({"type": original.qtype, "n": original.n, "original": original.accuracy,
                          f"original {level:.0%}": [_span(a, b, _percent)
                                                    for a, b in zip(original.low, original.high)]})
    if "pruned" in intervals:
        pruned = pd.DataFrame(intervals["pruned"])
        frame["pruned"] = pruned.accuracy
        frame[f"pruned {level:.0%}"] = [_span(a, b, _percent) for a, b in zip(pruned.low, pruned.high)]
    blocks = [page.paragraph(f"Accuracy per question type with its number of questions n and {level:.0%} "
                             f"{original.method.iloc[0]} interval (from the per-question answers):"),
              page.table(frame, {"n": str}, _percent)]
    if "paired_difference" in intervals:
        paired = pd.DataFrame(intervals["paired_difference"])
        table = pd.DataFrame({"type": paired.qtype, "n": paired.n,
                              "pruned − original (points)": [_difference_text(r)
                                                             for r in intervals["paired_difference"]],
                              "only original right": paired.only_original, "only pruned right": paired.only_pruned,
                              "McNemar p": paired.mcnemar_p,
                              "verdict": ["resolved" if r else "not resolved at this n" for r in paired.resolved]})
        blocks += [page.paragraph(f"Pruned minus original on the same questions, with a paired {level:.0%} "
                                  "bootstrap interval and the exact McNemar test (only the questions one model got "
                                  "right count):"),
                   page.table(table, {"n": str, "only original right": str, "only pruned right": str,
                                      "McNemar p": "{:.2g}".format})]
    return blocks


def _latency_blocks(latency: pd.DataFrame) -> list[page.Item]:
    """Latency: median and IQR per variant and the paired speedup interval with its noise flag."""
    needed = {"variant", "prefill_ms", "prefill_ms_iqr", "prefill_speedup", "prefill_speedup_low",
              "prefill_speedup_high", "noisy"}
    if not needed <= set(latency.columns):
        return [page.paragraph("This latency table has no speedup intervals (it was measured before they existed); "
                               "rerun eemllm latency for them."), page.table(latency, {"repeats": str, "batch": str})]
    level = latency.attrs.get("interval_level", uncertainty.LEVEL)
    frame = pd.DataFrame({
        "variant": latency.variant, "prefill ms": latency.prefill_ms, "IQR ms": latency.prefill_ms_iqr,
        "prefill speedup": latency.prefill_speedup,
        f"{level:.0%} interval": [_span(a, b, "{:.2f}×".format) for a, b in
                                  zip(latency.prefill_speedup_low, latency.prefill_speedup_high)],
        "noisy": [bool(v) if pd.notna(v) else False for v in latency.noisy]})
    if {"decode_tokens_per_s", "decode_speedup"} <= set(latency.columns):
        frame["decode tok/s"] = latency.decode_tokens_per_s
        frame["decode speedup"] = latency.decode_speedup
    setup = ", ".join(f"{c} {latency[c].iloc[0]}" for c in ("repeats", "batch", "prompt_tokens", "new_tokens", "device",
                                                          "dtype") if c in latency.columns)
    blocks = [page.paragraph(f"Medians over paired repeats ({setup}); the speedup interval is a bootstrap of the "
                             "median of the per-repeat ratios to the first variant. Every column is in latency.csv."),
              page.table(frame, {"prefill speedup": "{:.2f}×".format, "decode speedup": "{:.2f}×".format,
                             "prefill ms": "{:.1f}".format, "IQR ms": "{:.1f}".format,
                             "decode tok/s": "{:.0f}".format})]
    noisy = [str(v) for v, flag in zip(latency.variant, latency.noisy) if pd.notna(flag) and bool(flag)]
    if noisy:
        blocks.append(page.paragraph(f"Noisy (interval includes 1.0 or repeats spread > 10%) for "
                                     f"{', '.join(noisy)}: the timing spread on this machine is too large to call it "
                                     "faster or slower; rerun with more --repeats on a quiet machine."))
    return blocks


def _measured_on(inputs: ReportInputs) -> str:
    """Where the benchmark accuracies come from: data set, split and number of questions."""
    evaluation = dict(inputs.evaluation or {})
    n = evaluation.get("n", None if inputs.answers is None else len(inputs.answers))
    split = evaluation.get("split")
    where = " ".join(str(p) for p in (evaluation.get("dataset"), f"{split} split" if split else None) if p)
    if n is None:
        return f"Scored on {where or 'an unnamed data set'} (number of questions not recorded)."
    return f"Scored on {n} questions{f' of {where}' if where else ''}; no choice of the plan saw them."


def _scores_section(inputs: ReportInputs, out: Path) -> list[page.Item]:
    blocks: list[page.Item] = []
    if inputs.scores is not None or inputs.answers is not None:
        blocks.append(page.paragraph(_measured_on(inputs)))
    if inputs.scores is not None:
        original, pruned = inputs.scores["original"], inputs.scores["pruned"]
        keys = sorted(set(original) | set(pruned), key=lambda k: (k == "overall" or k.startswith("yes"), k))
        frame = pd.DataFrame({"metric": keys, "original": [original.get(k, math.nan) for k in keys],
                              "pruned": [pruned.get(k, math.nan) for k in keys]})
        frame["change"] = frame.pruned - frame.original
        blocks += [page.table(frame, {"change": lambda v: f"{100 * v:+.1f} points"}, _percent)]
    blocks += _accuracy_interval_blocks(accuracy_intervals(inputs.answers))
    if inputs.pruned_model is not None:
        href = Path(os.path.relpath(os.path.abspath(inputs.pruned_model), os.path.abspath(out))).as_posix() + "/"
        blocks.append(page.link("The pruned model", href, f"({href}; load it with eemllm_models.load_pruned)"))
    return [page.heading("Benchmark: original vs pruned", "scores"), *blocks] if blocks else []


def _other_sections(inputs: ReportInputs, figures: dict[str, bytes]) -> list[page.Item]:
    blocks: list[page.Item] = []
    if inputs.modes is not None:
        mean = inputs.modes.contribution.mean("sample").to_pandas().reset_index()
        level = inputs.modes.contribution_low.attrs.get("interval_level", uncertainty.LEVEL)
        for mode in map(str, inputs.modes["mode"].values):
            mean[f"{mode} {level:.0%}"] = [_span(a, b) for a, b in zip(
                inputs.modes.contribution_low.sel(mode=mode).values,
                inputs.modes.contribution_high.sel(mode=mode).values)]
        blocks += [page.heading("Mode contributions", "modes"),
                   page.paragraph("Divergence from the original output when only one layer runs a mode."),
                   page.figure(figures["modes.png"], "modes.png",
                               f"Contribution per layer and mode (log scale; values at or below {plots.FLOOR:g} "
                               "drawn there)"),
                   page.table(mean, {"layer": str}, "{:.3g}".format)]
    if inputs.attention is not None:
        blocks += [page.heading("Attention statistics", "attention"),
                   page.paragraph(f"Attention mass and entropy per layer and head, mean over "
                                  f"{inputs.attention.sizes['sample']} samples (the first "
                                  f"{inputs.attention.attrs.get('sink_tokens', '?')} token(s) count as sink)."),
                   page.figure(figures["attention.png"], "attention.png", "Attention statistics: layer × head")]
    if inputs.latency is not None:
        blocks += [page.heading("Latency", "latency"), *_latency_blocks(inputs.latency)]
    if inputs.answers is not None:
        shown = inputs.answers.head(ANSWER_ROWS)
        if "group" in shown.columns and "id" in shown.columns and (shown.group == shown.id).all():
            shown = shown.drop(columns="group")  # one group per question: the column repeats the id
        blocks += [page.heading("Answers", "answers"),
                   page.paragraph(f"The first {len(shown)} of {len(inputs.answers)} samples (all in answers.csv)."),
                   page.table(shown, default=None)]
    return blocks


def _provenance_section(inputs: ReportInputs, files: Sequence[str]) -> list[page.Item]:
    attrs = {k: v for k, v in inputs.lc.attrs.items()}
    blocks = [page.heading("Provenance", "provenance"), page.paragraph("The Layer Contribution result's attributes:"),
              page.table(pd.DataFrame({"attribute": list(attrs), "value": [str(v) for v in attrs.values()]}),
                         default=None)]
    if inputs.sources:
        blocks += [page.paragraph("Read from:"), page.table(pd.DataFrame({"input": list(inputs.sources),
                                                                  "file": list(inputs.sources.values())}))]
    blocks += [page.paragraph("Files in this folder:"), page.files(files)]
    return blocks




def _figures(inputs: ReportInputs, summary: dict) -> dict[str, bytes]:
    figures = {"plan.png": plots.plan_figure(inputs.plan), "lc.png": plots.lc_figure(inputs.lc)}
    if inputs.comparison is not None:
        ratio, pruned = summary["decoder_flops_ratio"], summary["accuracy"]["pruned"]
        figures["tradeoff.png"] = plots.tradeoff_figure(
            inputs.comparison, None if ratio is None or pruned is None else (ratio, pruned))
    if inputs.modes is not None:
        figures["modes.png"] = plots.modes_figure(inputs.modes)
    if inputs.attention is not None:
        figures["attention.png"] = plots.attention_figure(inputs.attention)
    return {name: plots.png_bytes(figure) for name, figure in figures.items()}


# ----------------------------------------------------------------------------- writing the folder

def _write_contents(inputs: ReportInputs, out: Path, staging: Path) -> None:
    """Write every report file into ``staging``; links are made as if it were already at ``out``."""
    summary = report_summary(inputs)
    figures = _figures(inputs, summary)
    for name, png in figures.items():
        atomic_write(staging / "figures" / name, lambda tmp, png=png: tmp.write_bytes(png))
    files = ["index.html", "report.md", "summary.json", "plan.json"]
    for name in PROBE_FILES:
        if getattr(inputs, name) is not None:
            probes.save_result(getattr(inputs, name), staging / PROBE_FILES[name])
            files.append(PROBE_FILES[name])
    for name in ("comparison", "latency", "methods", "answers"):
        frame = getattr(inputs, name)
        if frame is not None:
            atomic_write(staging / f"{name}.csv", lambda tmp, frame=frame: frame.to_csv(tmp, index=False))
            files.append(f"{name}.csv")
    files += [f"figures/{name}" for name in figures]
    atomic_write_text(staging / "plan.json", json.dumps(_jsonable(inputs.plan.to_dict()), indent=1) + "\n")
    atomic_write_text(staging / "summary.json", json.dumps(summary, indent=1, allow_nan=False) + "\n")
    attrs = inputs.lc.attrs
    model = str(attrs.get("model", "unnamed model"))
    title = inputs.title or f"Redundancy report: {Path(model).name or model}"
    subtitle = (f"{model} ({attrs.get('model_class', '?')}, {inputs.plan.n_layers} decoder layers); probed on "
                f"{attrs.get('dataset', '?')} ({attrs.get('dataset_split', '?')}, "
                f"{inputs.lc.sizes['sample']} samples); "
                f"generated {summary['generated_at']}")
    blocks = [*_headline(inputs, summary), *_claims_section(summary), *_plan_section(inputs, figures),
              *_scores_section(inputs, out), *_lc_section(inputs, figures, summary["selection_stability"]),
              *_comparison_section(inputs, figures), *_methods_section(inputs),
              *_other_sections(inputs, figures), *_provenance_section(inputs, files)]
    html_page, markdown = page.render(title, subtitle, blocks)
    atomic_write_text(staging / "report.md", markdown)
    atomic_write_text(staging / "index.html", html_page)


def _inside(path: str | os.PathLike, folder: Path) -> bool:
    return Path(os.path.abspath(path)).is_relative_to(Path(os.path.abspath(folder)))


def write_report(inputs: ReportInputs, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the report folder ``out`` (see the module docstring) and return its ``index.html``.

    ``out`` must not exist unless ``overwrite``; then it is replaced whole (a pruned model inside it,
    named by ``inputs.pruned_model``, is moved into the new folder). Refuses to replace a folder its
    inputs are read from.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; choose another --out")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite to replace it")
    read_from = [s for s in inputs.sources.values() if _inside(s, out)]
    if out.exists() and read_from:
        raise ValueError(f"--overwrite would replace {out}, which holds this report's inputs ({', '.join(read_from)}); "
                         "write the report to another --out")
    carried = None
    if inputs.pruned_model is not None and _inside(inputs.pruned_model, out):
        carried = Path(os.path.abspath(inputs.pruned_model)).relative_to(os.path.abspath(out))
        if carried == Path(".") or carried.parts[0] in {"index.html", "report.md", "summary.json", "plan.json",
                                                         "figures", *PROBE_FILES.values()}:
            raise ValueError(f"the pruned model path {inputs.pruned_model} collides with the report's own files; "
                             "save the pruned model elsewhere (e.g. OUT/pruned-model)")
    atomic_write_dir(out, lambda staging: _write_contents(inputs, out, staging), carry=[carried] if carried else [])
    return out / "index.html"
