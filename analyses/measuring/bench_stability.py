"""How many probe samples the ShortV choice needs before it stops depending on which samples were probed.

``python -m analyses.measuring.bench_stability [--pool 256] [--sizes 16 32 48 64 96 128] [--k 7] [--lc pool.nc]``
probes the visual Layer Contribution of ``--pool`` shapes-vqa train prompts on the embedded
default model once (the demo's calibration set and order: the first ``n`` of them are what the
demo probes with ``--probe-samples n``), or reads them from ``--lc``, then for each size ``n``
cuts the pool into disjoint draws of ``n`` samples and reports:

* ``stability_min`` / ``stability_mean``: per draw, the smallest and the mean share of bootstrap
  resamples in which each of the ``k`` chosen layers is among the ``k`` lowest
  (:func:`probes.uncertainty.selection_stability`), averaged over the draws;
* ``bootstrap_same_set``: share of resamples whose ``k`` lowest are exactly the chosen set;
* ``draws_same_set``: share of pairs of disjoint draws that choose the same set, and
  ``draws_overlap``: the mean number of shared layers over ``k``.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

import probes
from eemllm_models import load_default, load_shapes_vqa
from eemllm_models.machine import describe
from probes.uncertainty import selection_stability, set_agreement


def pool_lc(pool: int, seed: int = 0, batch_size: int = 8) -> xr.Dataset:
    """Layer Contribution of the first ``pool`` prompts of the demo's calibration order (train split, 400 rows)."""
    model, processor = load_default()
    data = load_shapes_vqa("train", n=max(400, pool), seed=seed)
    return probes.layer_contribution(model, processor, data, samples=pool, seed=seed, batch_size=batch_size)


def _chosen(visual: np.ndarray, k: int) -> frozenset[int]:
    return frozenset(np.argsort(visual.mean(0), kind="stable")[:k].tolist())


def stability_table(lc: xr.Dataset, sizes: list[int], k: int, resamples: int = 2000) -> pd.DataFrame:
    """One row per size ``n``: the figures of the module docstring over the disjoint draws of the pool."""
    visual = lc.lc.sel(group="visual").transpose("sample", "layer").values
    rows = []
    for n in sizes:
        draws = [visual[i * n:(i + 1) * n] for i in range(len(visual) // n)]
        if not draws:
            continue
        chosen = [_chosen(d, k) for d in draws]
        per_draw = [selection_stability(d, k, resamples, seed=i)[sorted(c)]
                    for i, (d, c) in enumerate(zip(draws, chosen))]
        pairs = list(itertools.combinations(chosen, 2))
        rows.append({
            "samples": n, "draws": len(draws),
            "stability_min": float(np.mean([s.min() for s in per_draw])),
            "stability_mean": float(np.mean([s.mean() for s in per_draw])),
            "bootstrap_same_set": float(np.mean([set_agreement(d, sorted(c), resamples, seed=i)
                                                 for i, (d, c) in enumerate(zip(draws, chosen))])),
            "draws_same_set": float(np.mean([a == b for a, b in pairs])) if pairs else float("nan"),
            "draws_overlap": float(np.mean([len(a & b) / k for a, b in pairs])) if pairs else float("nan"),
            "first_draw_layers": " ".join(map(str, sorted(chosen[0]))),
        })
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=int, default=256, help="prompts probed once (default 256)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 48, 64, 96, 128])
    parser.add_argument("--k", type=int, default=7, help="layers chosen (default 7: the demo's 60%% of 12)")
    parser.add_argument("--lc", type=Path, help="read (or, when missing, write) the pool's LC netCDF here")
    args = parser.parse_args(argv)
    if args.lc is not None and args.lc.is_file():
        lc = probes.open_result(args.lc, probe="layer_contribution")
    else:
        lc = pool_lc(args.pool)
        if args.lc is not None:
            probes.save_result(lc, args.lc)
    print(describe())
    print(stability_table(lc, args.sizes, args.k).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
