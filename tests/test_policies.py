import numpy as np
import pytest
import xarray as xr

from analyses.policies import freeze_plan, layer_ranking


def _lc_result(visual_lc, cosine) -> xr.Dataset:
    n = len(visual_lc)
    lc = np.stack([np.array(visual_lc), np.ones(n)], axis=-1)[None].repeat(2, axis=0)
    cos = np.stack([np.array(cosine), np.zeros(n)], axis=-1)[None].repeat(2, axis=0)
    dims = ("sample", "layer", "group")
    return xr.Dataset({"lc": (dims, lc), "cosine": (dims, cos)},
                      coords={"sample": ["a", "b"], "layer": range(n), "group": ["visual", "text"]},
                      attrs={"probe": "layer_contribution", "model": "m", "dataset": "d", "samples": 2, "seed": 0,
                             "divergence": "kl"})


def test_shortv_freezes_the_lowest_visual_lc_layers():
    lc = _lc_result([0.5, 0.01, 0.3, 0.0], [0.1, 0.2, 0.9, 0.8])
    plan = freeze_plan(lc, 2)
    assert plan.modes == ["full", "frozen", "full", "frozen"]
    assert plan.provenance["policy"] == "shortv" and plan.provenance["ranking"] == [3, 1, 2, 0]
    assert plan.provenance["probe_model"] == "m"
    assert freeze_plan(lc, 2, "cosine").layers("frozen") == (2, 3)


def test_random_policy_is_seeded():
    lc = _lc_result([0.5, 0.01, 0.3, 0.0, 0.2, 0.1], [0.0] * 6)
    assert freeze_plan(lc, 3, "random", seed=4).modes == freeze_plan(lc, 3, "random", seed=4).modes
    assert sorted(layer_ranking(lc, "random", seed=1)) == list(range(6))


def test_policy_errors_name_the_fix():
    lc = _lc_result([0.5, 0.01], [0.1, 0.2])
    with pytest.raises(ValueError, match="k must be between 0 and the model's 2 layers"):
        freeze_plan(lc, 3)
    with pytest.raises(ValueError, match="unknown policy 'fastv'"):
        freeze_plan(lc, 1, "fastv")
    with pytest.raises(ValueError, match="need a layer_contribution result"):
        freeze_plan(lc.assign_attrs(probe="attention_statistics"), 1)
