"""Layer-level against token-level redundancy at equal FLOPs: ``python -m analyses.measuring.bench_withdrawal``.

On a zoo model (default: the embedded one), the probes measure on train prompts (Layer Contribution,
mode contributions, withdrawal contribution); each method's plan is the one that reaches a decoder
prefill FLOPs target (``--target``, a share of the original) with the fewest changes:

* ``shortv``: the k lowest-visual-LC layers frozen, the smallest k that reaches the target;
* ``naavit`` / ``composite``: that mode in the layers of lowest mode contribution, as many as needed;
* ``vtw``: every visual token withdrawn from the latest layer that reaches the target;
* ``fastv``: FastV's pruning from layer 2, the largest keep fraction (in steps of 0.05) that reaches it;
* ``budget``: the budget policy's mix of layer modes and withdrawal, cheapest measured loss per saved FLOP.

A method that cannot reach the target (NAAViT saves only attention) is shown at the most it saves. Each
plan's FLOPs ratio is in the table, next to its accuracy on held-out test questions (n, Wilson interval,
the paired difference to the original with its interval) and its prefill speedup, decode speedup and
KV-cache bytes, measured side by side in one run (interleaved repeats). Writes the table as CSV.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

import probes
from eemllm_models import EfficiencyPlan, load_shapes_vqa, load_zoo
from eemllm_models.files import atomic_write
from eemllm_models.machine import cpu_name

from analyses.choosing.policies import budget_plan, freeze_plan
from analyses.evaluating.accuracy import accuracy_table, paired_table
from analyses.evaluating.evaluate import answer_frame
from analyses.measuring.flops import TokenCounts, flops_ratio
from analyses.measuring.latency import measure_latency
from analyses.measuring.tokens import dataset_token_counts

FASTV_LAYER = 2
"""FastV's K: tokens are ranked at layer K-1 and pruned from layer K on."""


def _first_reaching(plans: list[EfficiencyPlan], config, tokens: TokenCounts, target: float) -> EfficiencyPlan:
    """The first of ``plans`` (ordered by how much they change) whose FLOPs ratio is at most ``target``, else the last."""
    return next((p for p in plans if flops_ratio(config, p, tokens) <= target), plans[-1])


def method_plans(lc: xr.Dataset, modes: xr.Dataset, withdrawal: xr.Dataset, config, tokens: TokenCounts,
                 target: float) -> dict[str, EfficiencyPlan]:
    """Each method's plan at the FLOPs ``target`` (see the module docstring)."""
    n = lc.sizes["layer"]
    plans = {"shortv": _first_reaching([freeze_plan(lc, k) for k in range(1, n + 1)], config, tokens, target)}
    for mode in ("naavit", "composite"):
        order = [int(i) for i in modes.contribution.sel(mode=mode).mean("sample").to_series()
                 .sort_values(kind="stable").index]
        plans[mode] = _first_reaching([EfficiencyPlan.from_layers(n, order[:k], mode) for k in range(1, n + 1)],
                                      config, tokens, target)
    plans["vtw"] = _first_reaching([EfficiencyPlan.withdraw(n, layer) for layer in range(n - 1, 0, -1)],
                                   config, tokens, target)
    keeps = np.round(np.arange(0.95, -0.01, -0.05), 2)
    plans["fastv"] = _first_reaching([EfficiencyPlan.prune_tokens(n, FASTV_LAYER, float(k)) for k in keeps],
                                     config, tokens, target)
    plans["budget"] = budget_plan(modes, config, tokens, target, withdrawal=withdrawal)
    return plans


def describe(plan: EfficiencyPlan) -> str:
    """A short label of what ``plan`` changes."""
    parts = [f"{m} {list(plan.layers(m))}" for m in ("frozen", "naavit", "composite") if plan.layers(m)]
    parts += [f"keep {keep:g} from layer {layer}" for layer, keep in plan.keep_stages()]
    return "; ".join(parts) or "nothing"


def compare(model_name: str = "default", target: float = 0.5, probe_samples: int = 48, test_rows: int = 280,
            latency_prompts: int = 8, new_tokens: int = 32, repeats: int = 5, seed: int = 0) -> pd.DataFrame:
    """The comparison table: one row per method (``original`` first); see the module docstring."""
    model, processor = load_zoo(model_name)
    train = load_shapes_vqa("train", n=400, seed=seed)
    test = load_shapes_vqa("test", n=test_rows, seed=seed)
    common = dict(samples=probe_samples, seed=seed, progress=False)
    lc = probes.layer_contribution(model, processor, train, **common)
    modes = probes.mode_contribution(model, processor, train, **common)
    withdrawal = probes.withdrawal_contribution(model, processor, train, **common)
    tokens = dataset_token_counts(model, processor, test)
    plans = method_plans(lc, modes, withdrawal, model.config, tokens, target)
    original = answer_frame(model, processor, test, progress=False)
    rows = [{"method": "original", "plan": "nothing", "flops_ratio": 1.0,
             **_accuracy(accuracy_table(original))}]
    for method, plan in plans.items():
        frame = answer_frame(model, processor, test, plan=plan, progress=False)
        paired = paired_table(original.assign(pruned_correct=frame.correct.to_numpy())).iloc[-1]
        rows.append({"method": method, "plan": describe(plan), "flops_ratio": flops_ratio(model.config, plan, tokens),
                     **_accuracy(accuracy_table(frame)), "difference": paired.difference,
                     "difference_low": paired.low, "difference_high": paired.high})
    latency = measure_latency(model, processor, test["image"][:latency_prompts], test["question"][:latency_prompts],
                              {"original": None, **plans}, new_tokens=new_tokens, warmup=1, repeats=repeats,
                              progress=False).set_index("variant")
    table = pd.DataFrame(rows).set_index("method")
    columns = ["prefill_speedup", "prefill_speedup_low", "prefill_speedup_high", "decode_speedup",
               "kv_cache_bytes", "noisy"]
    table = table.join(latency[columns])
    table["ideal_prefill_speedup"] = 1 / table.flops_ratio
    table.attrs.update(model=model_name, target=target, probe_samples=probe_samples, test_rows=test_rows,
                       latency_prompts=latency_prompts, new_tokens=new_tokens, repeats=repeats,
                       machine=cpu_name())
    return table.reset_index()


def _accuracy(table: pd.DataFrame) -> dict:
    overall = table.iloc[-1]
    return {"n": int(overall.n), "accuracy": overall.accuracy, "accuracy_low": overall.low,
            "accuracy_high": overall.high}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="zoo model (default: the embedded one)")
    parser.add_argument("--target", type=float, default=0.5, help="decoder prefill FLOPs share (default 0.5)")
    parser.add_argument("--probe-samples", type=int, default=48)
    parser.add_argument("--test-rows", type=int, default=280)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench_withdrawal.csv"))
    args = parser.parse_args()
    table = compare(args.model, args.target, args.probe_samples, args.test_rows, repeats=args.repeats)
    with pd.option_context("display.width", 200, "display.max_colwidth", 60):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"machine: {table.attrs['machine']}; model {args.model}; target {args.target}; "
          f"{args.test_rows} test questions; probes on {args.probe_samples} train prompts")
    atomic_write(args.out, lambda tmp: table.to_csv(tmp, index=False))


if __name__ == "__main__":
    main()
