"""Policies: from probe results to an EfficiencyPlan, recorded in the plan's provenance.

Each policy ranks the decoder layers by a redundancy signal (lowest first) and freezes the
visual tokens of the first ``k``:

* ``shortv``: the lowest mean visual Layer Contribution (ShortV's rule);
* ``cosine``: the highest mean input/output cosine similarity of visual tokens (ShortV's
  ablation baseline);
* ``random``: a seeded random choice (the floor every signal must beat).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from eemllm_models import EfficiencyPlan

POLICIES = ("shortv", "cosine", "random")


def _check_lc_result(lc: xr.Dataset) -> None:
    if lc.attrs.get("probe") != "layer_contribution" or "lc" not in lc:
        raise ValueError("the policies need a layer_contribution result (probes.layer_contribution, or lc.nc "
                         f"from `eemllm probe`); got a {lc.attrs.get('probe', 'non-probe')!r} dataset")


def layer_ranking(lc: xr.Dataset, policy: str, seed: int = 0) -> list[int]:
    """Decoder layers ordered from most to least redundant for visual tokens under ``policy``."""
    _check_lc_result(lc)
    n_layers = lc.sizes["layer"]
    if policy == "shortv":
        score = lc.lc.sel(group="visual").mean("sample").values
    elif policy == "cosine":
        score = -lc.cosine.sel(group="visual").mean("sample").values
    elif policy == "random":
        return np.random.default_rng(seed).permutation(n_layers).tolist()
    else:
        raise ValueError(f"unknown policy {policy!r}; choose from {POLICIES}")
    return [int(i) for i in np.argsort(score, kind="stable")]


def freeze_plan(lc: xr.Dataset, k: int, policy: str = "shortv", seed: int = 0) -> EfficiencyPlan:
    """Freeze visual tokens in the ``k`` most redundant layers under ``policy``; the rest run ``full``.

    The plan's provenance names the policy, ``k``, the ranking and the probe result's model,
    data set, samples and seed.
    """
    n_layers = lc.sizes["layer"]
    if not 0 <= k <= n_layers:
        raise ValueError(f"k must be between 0 and the model's {n_layers} layers, got {k}")
    ranking = layer_ranking(lc, policy, seed)
    provenance = {"policy": policy, "k": k, "ranking": ranking,
                  **{f"probe_{key}": lc.attrs[key] for key in ("model", "dataset", "samples", "seed", "divergence")
                     if key in lc.attrs}}
    if policy == "random":
        provenance["policy_seed"] = seed
    return EfficiencyPlan.from_layers(n_layers, ranking[:k], "frozen", **provenance)
