"""Intervals and selection stability: textbook values, points for constants, seeds reproduce, and
probe results carry their intervals through netCDF."""

import numpy as np
import pytest
import xarray as xr

import probes
from probes.uncertainty import (
    bootstrap_interval,
    mcnemar_p_value,
    newcombe_interval,
    paired_difference,
    paired_ratio_interval,
    resampled_means,
    selection_stability,
    set_agreement,
    stability_by_k,
    wilson_interval,
    with_intervals,
)


def test_wilson_and_newcombe_match_the_textbook_values():
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=5e-5)
    # Newcombe (1998), Stat. Med. 17, 857-872: 81/263 and 15/148 (Wilson), 56/70 - 48/80 (method 10).
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=5e-5)
    assert wilson_interval(15, 148) == pytest.approx((0.0624, 0.1605), abs=5e-5)
    assert newcombe_interval(56, 70, 48, 80) == pytest.approx((0.0524, 0.3339), abs=5e-5)
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(0, 10)[0] == 0.0
    low90, high90 = wilson_interval(8, 10, level=0.9)
    assert 0.4902 < low90 < high90 < 0.9433
    for bad in (dict(successes=3, n=0), dict(successes=11, n=10)):
        with pytest.raises(ValueError):
            wilson_interval(**bad)
    with pytest.raises(ValueError, match="level"):
        wilson_interval(8, 10, level=95)


def test_mcnemar_exact_p_value():
    a = np.array([1] * 7 + [0] * 1 + [1] * 10)
    b = np.array([0] * 7 + [1] * 1 + [1] * 10)
    assert mcnemar_p_value(a, b) == pytest.approx(2 * 9 / 256)  # 1 of 8 discordant: 2 P(X <= 1), X ~ B(8, 1/2)
    assert mcnemar_p_value(a, a) == 1.0
    with pytest.raises(ValueError, match="0/1"):
        mcnemar_p_value([0.5, 1], [1, 1])


def test_bootstrap_interval_is_a_point_for_a_constant_and_reproducible():
    low, high = bootstrap_interval(np.full((30, 4), 0.37))
    assert (low == 0.37).all() and (high == 0.37).all()
    rng = np.random.default_rng(5)
    values = rng.exponential(size=(40, 3, 2))
    first, second = bootstrap_interval(values, seed=3), bootstrap_interval(values, seed=3)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert not np.array_equal(first[0], bootstrap_interval(values, seed=4)[0])
    mean = values.mean(0)
    assert first[0].shape == (3, 2) and (first[0] < mean).all() and (mean < first[1]).all()
    # The percentile interval of a mean of 40 is about mean ± 1.96 sd / sqrt(40).
    standard_error = values.std(0, ddof=1) / np.sqrt(40)
    np.testing.assert_allclose(first[1] - first[0], 2 * 1.96 * standard_error, rtol=0.2)
    # A wider level gives a wider interval; resampled means average to the mean.
    wide = bootstrap_interval(values, level=0.99, seed=3)
    assert (wide[0] <= first[0]).all() and (wide[1] >= first[1]).all()
    np.testing.assert_allclose(resampled_means(values, 4000).mean(0), mean, rtol=0.02)
    with pytest.raises(ValueError, match="at least one sample"):
        bootstrap_interval(np.empty((0, 3)))
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_interval([1.0, np.nan])


def test_paired_difference_pairs_the_questions():
    rng = np.random.default_rng(0)
    a = (rng.random(200) < 0.9).astype(int)
    b = a.copy()
    b[np.flatnonzero(a)[:20]] = 0  # the pruned model loses 20 questions it had right
    result = paired_difference(a, b)
    assert result.difference == pytest.approx(-0.1) and result.n == 200
    assert (result.only_a, result.only_b) == (20, 0)
    assert result.low < -0.1 < result.high < 0 and result.resolved
    assert result.mcnemar_p == pytest.approx(2 * 0.5**20)
    same = paired_difference(a, a)
    assert (same.difference, same.low, same.high, same.resolved) == (0.0, 0.0, 0.0, False)
    # Paired is much tighter than treating the two accuracies as independent.
    low, high = newcombe_interval(int(b.sum()), 200, int(a.sum()), 200)
    assert result.high - result.low < 0.7 * (high - low)
    assert paired_difference(a, b, seed=1).to_dict()["resolved"] is True
    with pytest.raises(ValueError, match="one length"):
        paired_difference(a, b[:-1])


def test_paired_ratio_interval_of_latency():
    original = np.array([100.0, 110, 105, 98, 120, 101, 99, 102, 108])
    assert paired_ratio_interval(original, original / 1.5) == pytest.approx((1.5, 1.5, 1.5))
    noisy = original / np.array([0.8, 1.3, 1.1, 0.9, 1.4, 0.95, 1.2, 1.05, 0.85])
    median, low, high = paired_ratio_interval(original, noisy)
    assert low <= median <= high and low < 1.0 < high
    assert paired_ratio_interval(original, noisy, seed=2) == paired_ratio_interval(original, noisy, seed=2)


def test_selection_stability_counts_how_often_a_layer_is_among_the_k_lowest():
    rng = np.random.default_rng(1)
    n, means = 32, np.array([5.0, 0.1, 4.0, 0.2, 3.0, 0.3])
    values = means + 0.05 * rng.standard_normal((n, 6))
    stability = selection_stability(values, 3)
    np.testing.assert_array_equal(stability, [0, 1, 0, 1, 0, 1])
    assert set_agreement(values, [1, 3, 5]) == 1.0 and set_agreement(values, [0, 1, 3]) == 0.0
    # Two layers that are equal up to noise share their place among the 2 lowest.
    tied = np.column_stack([1 + rng.standard_normal(n), 1 + rng.standard_normal(n), np.full(n, 0.0),
                            np.full(n, 9.0)])
    shared = selection_stability(tied, 2)
    assert shared[2] == 1.0 and shared[3] == 0.0 and 0.2 < shared[0] < 0.8 and shared.sum() == pytest.approx(2)
    by_k = stability_by_k(tied)
    assert by_k.shape == (4, 4)
    np.testing.assert_array_equal(by_k[1], shared)
    np.testing.assert_allclose(by_k.sum(axis=1), [1, 2, 3, 4])
    np.testing.assert_array_equal(selection_stability(tied, 2, seed=7), selection_stability(tied, 2, seed=7))
    with pytest.raises(ValueError, match="k must be"):
        selection_stability(tied, 5)


def test_probe_results_carry_intervals_through_netcdf(default_model, tmp_path):
    from eemllm_models import load_shapes_vqa

    model, processor = default_model
    data = load_shapes_vqa("train", n=12)
    lc = probes.layer_contribution(model, processor, data, samples=6, batch_size=3, progress=False)
    assert lc.lc_low.dims == ("layer", "group") and lc.lc_high.dims == ("layer", "group")
    mean = lc.lc.mean("sample")
    assert (lc.lc_low <= mean + 1e-12).all() and (mean <= lc.lc_high + 1e-12).all()
    for variable in ("lc_low", "lc_high", "selection_stability"):
        attrs = lc[variable].attrs
        assert attrs["interval_level"] == 0.95 and attrs["interval_resamples"] == 2000
        assert attrs["interval_seed"] == 0 and "bootstrap" in attrs["interval_method"]
    assert lc.attrs["interval_level"] == 0.95
    assert lc.selection_stability.dims == ("k", "layer", "group")
    np.testing.assert_allclose(lc.selection_stability.sum("layer").values,
                               np.repeat(lc.k.values[:, None], 2, axis=1))
    np.testing.assert_array_equal(lc.selection_stability.sel(k=3, group="visual").values,
                                  selection_stability(lc.lc.sel(group="visual").values, 3))
    probes.save_result(lc, tmp_path / "lc.nc")
    reopened = probes.open_result(tmp_path / "lc.nc", probe="layer_contribution")
    xr.testing.assert_identical(reopened, lc)

    modes = probes.mode_contribution(model, processor, data, samples=4, batch_size=4, modes=("frozen", "naavit"),
                                     progress=False)
    assert modes.contribution_low.dims == ("layer", "mode") and modes.selection_stability.dims == (
        "k", "layer", "mode")
    probes.save_result(modes, tmp_path / "modes.nc")
    xr.testing.assert_identical(probes.open_result(tmp_path / "modes.nc"), modes)


def test_with_intervals_names_what_it_needs():
    result = xr.Dataset({"x": (("layer",), np.zeros(3))})
    with pytest.raises(ValueError, match="'sample' and 'layer'"):
        with_intervals(result, "x")
    values = xr.Dataset({"x": (("layer", "sample"), np.ones((3, 5)))})
    added = with_intervals(values, "x", level=0.9, resamples=50, seed=2)
    assert added.x_low.dims == ("layer",) and (added.x_low == 1).all() and added.x_low.attrs["interval_seed"] == 2



def test_intervals_name_the_samples_whose_measure_is_missing():
    from probes.uncertainty import with_intervals

    values = np.ones((3, 2))
    values[1, 0] = np.nan
    result = xr.Dataset({"lc": (("sample", "layer"), values)}, coords={"sample": ["a", "b", "c"]})
    with pytest.raises(ValueError, match=r"NaN for 1 samples \(e.g. \['b'\]\).*drop those rows"):
        with_intervals(result, "lc")
