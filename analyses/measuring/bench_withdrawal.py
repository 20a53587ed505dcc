"""Layer-level against token-level redundancy at equal FLOPs: ``python -m analyses.measuring.bench_withdrawal``.

On a zoo model (default: the embedded one), the probes measure on train prompts (Layer Contribution,
mode contributions, withdrawal contribution); each method's plan is the one that reaches a decoder
prefill FLOPs target (``--target``, a share of the original) with the fewest changes
(:mod:`analyses.choosing.methods`: ShortV freezing, NAAViT, composite, VTW withdrawal, FastV pruning and
the budget mix). Each plan's FLOPs ratio is in the table, next to its accuracy on held-out test questions
(n, Wilson interval, the paired difference to the original with its interval) and its prefill speedup, decode
speedup and KV-cache bytes, measured side by side in one run (interleaved repeats). Writes the table as CSV.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

import probes
from eemllm_models import load_shapes_vqa, load_zoo
from eemllm_models.files import atomic_write
from eemllm_models.machine import cpu_name

from analyses.choosing.methods import method_plans, method_table
from analyses.evaluating.evaluate import answer_frame
from analyses.measuring.latency import measure_latency
from analyses.measuring.tokens import dataset_token_counts


def compare(model_name: str = "default", target: float = 0.5, probe_samples: int = 48, test_rows: int = 280,
            latency_prompts: int = 8, new_tokens: int = 32, repeats: int = 5, seed: int = 0) -> pd.DataFrame:
    """The comparison table: one row per method (``original`` first); see the module docstring."""
    model, processor = load_zoo(model_name)
    train = load_shapes_vqa("train", n=400, seed=seed)
    test = load_shapes_vqa("test", n=test_rows, seed=seed)
    common = dict(samples=probe_samples, seed=seed, progress=False)
    lc, modes = probes.layer_and_mode_contribution(model, processor, train, **common)
    withdrawal = probes.withdrawal_contribution(model, processor, train, **common)
    tokens = dataset_token_counts(model, processor, test)
    plans = method_plans(lc, modes, withdrawal, model.config, tokens, target)
    original = answer_frame(model, processor, test, progress=False)
    latency = measure_latency(model, processor, test["image"][:latency_prompts], test["question"][:latency_prompts],
                              {"original": None, **plans}, new_tokens=new_tokens, warmup=1, repeats=repeats,
                              progress=False)
    table = method_table(model, processor, test, original, plans, tokens, latency, target)
    table.attrs.update(model=model_name, target=target, probe_samples=probe_samples, test_rows=test_rows,
                       latency_prompts=latency_prompts, new_tokens=new_tokens, repeats=repeats,
                       machine=cpu_name())
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="zoo model (default: the embedded one)")
    parser.add_argument("--target", type=float, default=0.5, help="decoder prefill FLOPs share (default 0.5)")
    parser.add_argument("--probe-samples", type=int, default=48)
    parser.add_argument("--test-rows", type=int, default=280)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench_withdrawal.csv"))
    args = parser.parse_args()
    if not 0 < args.target <= 1:
        parser.error(f"--target {args.target} is not a share of the original FLOPs; pass one in (0, 1], e.g. 0.5")
    table = compare(args.model, args.target, args.probe_samples, args.test_rows, repeats=args.repeats)
    with pd.option_context("display.width", 200, "display.max_colwidth", 60):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"machine: {table.attrs['machine']}; model {args.model}; target {args.target}; "
          f"{args.test_rows} test questions; probes on {args.probe_samples} train prompts")
    atomic_write(args.out, lambda tmp: table.to_csv(tmp, index=False))


if __name__ == "__main__":
    main()
