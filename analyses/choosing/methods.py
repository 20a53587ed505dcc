"""Layer-level against token-level redundancy at equal FLOPs: each method's plan at a FLOPs target, and the table
that puts them side by side on held-out questions (what ``bench_withdrawal`` and the demo's report show).

Each method's plan is the one that reaches a decoder prefill FLOPs target (a share of the original) with the
fewest changes:

* ``shortv``: the k lowest-visual-LC layers frozen, the smallest k that reaches the target;
* ``naavit`` / ``composite``: that mode in the layers of lowest mode contribution, as many as needed;
* ``vtw``: every visual token withdrawn from the latest layer that reaches the target;
* ``fastv``: FastV's pruning from layer 2, the largest keep fraction (in steps of 0.05) that reaches it;
* ``budget``: the budget policy's mix of layer modes and withdrawal, cheapest measured loss per saved FLOP.

A method that cannot reach the target (NAAViT saves only attention) is shown at the most it saves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import datasets
import pandas as pd
import xarray as xr
from transformers import PretrainedConfig, PreTrainedModel, ProcessorMixin

from eemllm_models import EfficiencyPlan

from analyses.choosing.policies import budget_plan, freeze_plan
from analyses.evaluating.accuracy import accuracy_table, paired_table
from analyses.evaluating.evaluate import answer_frame
from analyses.measuring.flops import TokenCounts, flops_ratio

FASTV_LAYER = 2
"""FastV's K: tokens are ranked at layer K-1 and pruned from layer K on."""
LATENCY_COLUMNS = ("prefill_speedup", "prefill_speedup_low", "prefill_speedup_high", "decode_speedup",
                   "kv_cache_bytes", "noisy")
"""The columns of :func:`analyses.measuring.latency.measure_latency` that :func:`method_table` joins."""


def _first_reaching(plans: list[EfficiencyPlan], config: PretrainedConfig, tokens: TokenCounts,
                    target: float) -> EfficiencyPlan:
    """The first of ``plans`` (ordered by how much they change) whose FLOPs ratio is at most ``target``, else the
    last."""
    return next((p for p in plans if flops_ratio(config, p, tokens) <= target), plans[-1])


def method_plans(lc: xr.Dataset, modes: xr.Dataset, withdrawal: xr.Dataset, config: PretrainedConfig,
                 tokens: TokenCounts, target: float) -> dict[str, EfficiencyPlan]:
    """Each method's plan (the module docstring's, in its order) at the decoder prefill FLOPs ``target`` for
    prompts of ``tokens``, from the probes' results (``probes.layer_contribution``, ``mode_contribution``,
    ``withdrawal_contribution``)."""
    n = lc.sizes["layer"]
    plans = {"shortv": _first_reaching([freeze_plan(lc, k) for k in range(1, n + 1)], config, tokens, target)}
    for mode in ("naavit", "composite"):
        order = [int(i) for i in modes.contribution.sel(mode=mode).mean("sample").to_series()
                 .sort_values(kind="stable").index]
        plans[mode] = _first_reaching([EfficiencyPlan.from_layers(n, order[:k], mode) for k in range(1, n + 1)],
                                      config, tokens, target)
    plans["vtw"] = _first_reaching([EfficiencyPlan.withdraw(n, layer) for layer in range(n - 1, 0, -1)],
                                   config, tokens, target)
    keeps = [round(0.05 * i, 2) for i in range(19, -1, -1)]  # 0.95, 0.9, ..., 0.0 (no -0.0 from arange)
    plans["fastv"] = _first_reaching([EfficiencyPlan.prune_tokens(n, FASTV_LAYER, k) for k in keeps],
                                     config, tokens, target)
    plans["budget"] = budget_plan(modes, config, tokens, target, withdrawal=withdrawal)
    return plans


def layer_ranges(layers: Sequence[int]) -> str:
    """Sorted layer indices as runs: ``[2, 3, 4, 5, 7, 9, 10]`` -> ``"2-5, 7, 9-10"``."""
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def describe(plan: EfficiencyPlan) -> str:
    """A short label of what ``plan`` changes: ``"frozen 2-5, 7; keep 0 from layer 24"``."""
    parts = [f"{m} {layer_ranges(plan.layers(m))}" for m in ("frozen", "naavit", "composite") if plan.layers(m)]
    parts += [f"keep {keep:g} from layer {layer}" for layer, keep in plan.keep_stages()]
    return "; ".join(parts) or "nothing"


def _accuracy(frame: pd.DataFrame) -> dict:
    overall = accuracy_table(frame).iloc[-1]
    return {"n": int(overall.n), "accuracy": overall.accuracy, "accuracy_low": overall.low,
            "accuracy_high": overall.high}


def method_table(model: PreTrainedModel, processor: ProcessorMixin, evaluation: datasets.Dataset,
                 original: pd.DataFrame, plans: Mapping[str, EfficiencyPlan], tokens: TokenCounts,
                 latency: pd.DataFrame, target: float, batch_size: int = 16) -> pd.DataFrame:
    """One row per method (``original`` first): its plan, the FLOPs ``target`` it was chosen for (:func:`method_plans`),
    its FLOPs ratio and ideal prefill speedup, its accuracy on the
    ``evaluation`` questions (``n``, Wilson interval) and the paired difference to the original's answers
    ``original`` (:func:`~analyses.evaluating.evaluate.answer_frame` of the same questions; 0..1 scale, bootstrap
    interval), and the :data:`LATENCY_COLUMNS` of ``latency`` (``measure_latency`` with an ``original`` variant and
    one variant per method, measured side by side).
    """
    missing = {"original", *plans} - set(latency.variant)
    if missing:
        raise ValueError(f"the latency table has no variants {sorted(missing)}; measure them with measure_latency("
                         "..., {'original': None, **plans}) in one run")
    rows = [{"method": "original", "plan": "nothing", "flops_ratio": 1.0, **_accuracy(original)}]
    for method, plan in plans.items():
        frame = answer_frame(model, processor, evaluation, plan=plan, batch_size=batch_size, progress=False)
        paired = paired_table(original.assign(pruned_correct=frame.correct.to_numpy())).iloc[-1]
        rows.append({"method": method, "plan": describe(plan), "flops_ratio": flops_ratio(model.config, plan, tokens),
                     **_accuracy(frame), "difference": paired.difference, "difference_low": paired.low,
                     "difference_high": paired.high})
    table = pd.DataFrame(rows).set_index("method").join(latency.set_index("variant")[list(LATENCY_COLUMNS)])
    table["ideal_prefill_speedup"] = 1 / table.flops_ratio
    table["target"] = target
    return table.reset_index()
