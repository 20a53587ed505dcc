"""Cost of the Layer Contribution sweep against the naive L+1 full passes per group, side by side.

``python -m analyses.measuring.bench_probes [--samples 16] [--repeats 3] [--out results.csv]`` runs
``probes.layer_contribution`` on the embedded default model (all layers, both groups) with
``implementation="sweep"`` and with ``"reference"`` (one full forward pass of the model, vision
tower included, per layer and group, plus the original) on the same samples, alternating the two
inside each repeat, and prints the median times, their ratio and the largest difference between
the two results.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import pandas as pd

import probes
from eemllm_models import load_default, load_shapes_vqa
from eemllm_models.files import atomic_write
from eemllm_models.machine import describe

IMPLEMENTATIONS = ("sweep", "reference")


def time_sweep(samples: int, repeats: int, batch_size: int = 8) -> tuple[pd.DataFrame, float]:
    """Median seconds per implementation over ``repeats`` interleaved runs, and the max |sweep - reference|."""
    model, processor = load_default()
    data = load_shapes_vqa("train", n=max(samples, 40))
    times: dict[str, list[float]] = {name: [] for name in IMPLEMENTATIONS}
    results = {}
    for _ in range(repeats):
        for name in IMPLEMENTATIONS:
            start = time.perf_counter()
            results[name] = probes.layer_contribution(model, processor, data, samples=samples, batch_size=batch_size,
                                                      implementation=name, progress=False)
            times[name].append(time.perf_counter() - start)
    naive = statistics.median(times["reference"])
    table = pd.DataFrame([
        {"implementation": name, "samples": samples, "median_s": statistics.median(values),
         "spread_s": max(values) - min(values), "of_naive": statistics.median(values) / naive}
        for name, values in times.items()
    ])
    difference = float(abs(results["sweep"].lc - results["reference"].lc).max())
    return table, difference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="CSV file for the results")
    args = parser.parse_args()
    table, difference = time_sweep(args.samples, args.repeats)
    print(f"{describe()}, fp32; default model (12 layers), both groups")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"max |LC(sweep) - LC(reference)| = {difference:.2e} nats")
    if args.out is not None:
        atomic_write(args.out, lambda tmp: table.assign(max_abs_difference=difference).to_csv(tmp, index=False))


if __name__ == "__main__":
    main()
