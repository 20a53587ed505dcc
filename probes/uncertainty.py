"""How sure a measured number is: seeded bootstrap and exact intervals over samples, and how stable a choice is.

Every function is deterministic given its ``seed`` and vectorised with numpy (no Python loop
over resamples):

* :func:`bootstrap_interval`: percentile bootstrap interval of a mean over samples, for every
  entry of an array at once (LC per layer and group);
* :func:`wilson_interval`: Wilson score interval of a proportion (an accuracy: ``k`` of ``n``);
* :func:`newcombe_interval`: Newcombe's hybrid-score interval of the difference of two
  independent proportions (two accuracies on different questions);
* :func:`paired_difference`: paired bootstrap interval of the difference of two per-question
  outcomes (original vs pruned on the same questions), with the exact McNemar p-value;
* :func:`paired_ratio_interval`: bootstrap interval of the median ratio over paired repeats
  (a latency speedup);
* :func:`selection_stability` / :func:`stability_by_k`: how often each layer is among the ``k``
  lowest mean values across bootstrap resamples of the samples (how much a policy's choice
  depends on which samples were probed); :func:`set_agreement`: how often the chosen set is
  exactly the ``k`` lowest.
* :func:`with_intervals`: a probe result with ``<variable>_low``/``_high`` and
  ``selection_stability`` variables added (what ``layer_contribution`` and
  ``mode_contribution`` return); the settings are the variables' attrs.

Levels are in ``[0, 1]`` (0.95 is a 95% interval).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np
import xarray as xr
from numpy.typing import ArrayLike

LEVEL = 0.95
"""Default interval level."""
RESAMPLES = 2000
"""Default number of bootstrap resamples."""
SEED = 0
"""Default bootstrap seed."""
BOOTSTRAP_METHOD = "percentile bootstrap over samples"


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level is a coverage in (0, 1) (0.95 for a 95% interval), got {level}")


def _check_resamples(resamples: int) -> None:
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")


def _samples(values: ArrayLike, name: str = "values") -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 0 or array.shape[0] == 0:
        raise ValueError(f"{name} needs at least one sample along its first axis, got shape {array.shape}")
    if np.isnan(array).any():
        raise ValueError(f"{name} holds NaN values; drop or fill them first")
    return array


def resample_weights(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """Bootstrap resamples of ``n`` samples as counts: ``[resample, sample]`` integers, each row summing to ``n``.

    Row ``r`` says how often each sample is drawn in resample ``r`` (drawing ``n`` with
    replacement); ``counts @ values / n`` are the resampled means.
    """
    _check_resamples(resamples)
    if n < 1:
        raise ValueError(f"need at least one sample, got {n}")
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples)


def resampled_means(values: ArrayLike, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """Means over bootstrap resamples of the first axis: ``values`` ``[sample, *rest]`` -> ``[resample, *rest]``.

    Computed as the sample mean plus the resampled mean of the deviations, so a constant input
    gives exactly that constant in every resample.
    """
    array = _samples(values)
    n = array.shape[0]
    flat = array.reshape(n, -1)
    centre = flat.mean(axis=0)
    weights = resample_weights(n, resamples, seed)
    means = centre + weights @ (flat - centre) / n
    return means.reshape((resamples, *array.shape[1:]))


def _percentiles(draws: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(draws, [tail, 100 - tail], axis=0)
    return low, high


def bootstrap_interval(values: ArrayLike, level: float = LEVEL, resamples: int = RESAMPLES,
                       seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of the mean over the first axis.

    ``values``: ``[sample, *rest]``; returns ``(low, high)``, each ``[*rest]`` (0-d arrays for a
    1-d input). The same ``seed`` gives the same interval; a constant gives a point.
    """
    _check_level(level)
    return _percentiles(resampled_means(values, resamples, seed), level)


def _z(level: float) -> float:
    _check_level(level)
    return NormalDist().inv_cdf(0.5 + level / 2)


def wilson_interval(successes: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` of a proportion ``successes / n`` (``n >= 1``).

    It stays inside [0, 1] and keeps its coverage at small ``n`` and near 0 or 1, where the
    normal (Wald) interval collapses to a point.
    """
    if n < 1:
        raise ValueError(f"a proportion needs n >= 1, got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in 0..n ({n}), got {successes}")
    z = _z(level)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (0.0 if successes == 0 else max(0.0, centre - half)), (1.0 if successes == n else min(1.0, centre + half))


def newcombe_interval(successes_a: int, n_a: int, successes_b: int, n_b: int,
                      level: float = LEVEL) -> tuple[float, float]:
    """Newcombe's hybrid score interval ``(low, high)`` of ``successes_a / n_a - successes_b / n_b``
    for two independent proportions (method 10 of Newcombe 1998, from the two Wilson intervals)."""
    p_a, p_b = successes_a / n_a, successes_b / n_b
    low_a, high_a = wilson_interval(successes_a, n_a, level)
    low_b, high_b = wilson_interval(successes_b, n_b, level)
    difference = p_a - p_b
    return (difference - math.sqrt((p_a - low_a) ** 2 + (high_b - p_b) ** 2),
            difference + math.sqrt((high_a - p_a) ** 2 + (p_b - low_b) ** 2))


def mcnemar_p_value(a: ArrayLike, b: ArrayLike) -> float:
    """Exact (binomial) two-sided McNemar p-value for paired 0/1 outcomes ``a``, ``b`` ``[question]``.

    Only the discordant pairs count: under the null, each of the ``n`` questions that exactly one
    of ``a``/``b`` gets right is ``a``'s with probability 1/2. 1.0 when there are none.
    """
    a, b = _paired(a, b)
    if not (np.isin(a, (0, 1)).all() and np.isin(b, (0, 1)).all()):
        raise ValueError("McNemar's test needs 0/1 outcomes (correct or not); got other values")
    only_a = int(((a == 1) & (b == 0)).sum())
    only_b = int(((a == 0) & (b == 1)).sum())
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2**n)


def _paired(a: ArrayLike, b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a, b = _samples(a, "a"), _samples(b, "b")
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired outcomes need two 1-d arrays of one length, got shapes {a.shape} and {b.shape}")
    return a, b


@dataclass(frozen=True)
class PairedDifference:
    """``mean(b) - mean(a)`` over paired questions, its bootstrap interval, and McNemar's test.

    ``only_a``/``only_b``: questions scored 1 by one side only (for 0/1 outcomes; else NaN
    ``mcnemar_p``). ``resolved``: the interval excludes 0.
    """

    difference: float
    low: float
    high: float
    n: int
    only_a: int
    only_b: int
    mcnemar_p: float
    level: float
    method: str

    @property
    def resolved(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict:
        return {**asdict(self), "resolved": self.resolved}


def paired_difference(a: ArrayLike, b: ArrayLike, level: float = LEVEL, resamples: int = RESAMPLES,
                      seed: int = SEED) -> PairedDifference:
    """Difference ``mean(b) - mean(a)`` of paired per-question outcomes ``a``, ``b`` ``[question]``
    (0/1 correctness or scores), with a paired bootstrap interval (questions resampled, both
    sides together) and, for 0/1 outcomes, the exact McNemar p-value."""
    a, b = _paired(a, b)
    low, high = bootstrap_interval(b - a, level, resamples, seed)
    binary = np.isin(a, (0, 1)).all() and np.isin(b, (0, 1)).all()
    return PairedDifference(
        difference=float(b.mean() - a.mean()), low=float(low), high=float(high), n=len(a),
        only_a=int(((a == 1) & (b == 0)).sum()), only_b=int(((a == 0) & (b == 1)).sum()),
        mcnemar_p=mcnemar_p_value(a, b) if binary else math.nan, level=level,
        method="paired " + BOOTSTRAP_METHOD + (" + exact McNemar" if binary else ""))


def paired_ratio_interval(numerator: ArrayLike, denominator: ArrayLike, level: float = LEVEL,
                          resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float, float]:
    """Median of the paired ratios ``numerator[i] / denominator[i]`` ``[repeat]`` and a bootstrap
    interval of that median (repeats resampled): ``(median, low, high)``.

    For a speedup, ``numerator`` is the original's time and ``denominator`` the variant's, paired
    by repeat (measured side by side).
    """
    _check_level(level)
    _check_resamples(resamples)
    numerator, denominator = _paired(numerator, denominator)
    if (denominator == 0).any():
        raise ValueError("a denominator is 0; ratios need non-zero denominators")
    ratios = numerator / denominator
    draws = ratios[np.random.default_rng(seed).integers(0, len(ratios), size=(resamples, len(ratios)))]
    low, high = _percentiles(np.median(draws, axis=1), level)
    return float(np.median(ratios)), float(low), float(high)


def _ranks(means: np.ndarray) -> np.ndarray:
    """Rank of each layer (0 = lowest) along the last axis; ties broken by layer index, as a stable sort."""
    return np.argsort(np.argsort(means, axis=-1, kind="stable"), axis=-1, kind="stable")


def selection_stability(values: ArrayLike, k: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """For each layer, the share of bootstrap resamples of the samples in which its mean is among the ``k`` lowest.

    ``values``: ``[sample, layer]`` (e.g. visual LC per sample). Returns ``[layer]`` in [0, 1];
    the ``k`` layers a policy chose by the full-sample mean should all be near 1 for a stable choice.
    """
    means = resampled_means(values, resamples, seed)
    if means.ndim != 2:
        raise ValueError(f"values must be [sample, layer], got shape {np.shape(values)}")
    if not 0 <= k <= means.shape[1]:
        raise ValueError(f"k must be in 0..{means.shape[1]} (the number of layers), got {k}")
    return (_ranks(means) < k).mean(axis=0)


def stability_by_k(values: ArrayLike, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """:func:`selection_stability` for every ``k`` in ``1..L`` at once: ``values`` ``[sample, layer, *rest]``
    -> ``[k, layer, *rest]`` (row ``k - 1`` for ``k``), ranking the layers separately for each ``rest`` entry."""
    means = resampled_means(values, resamples, seed)
    if means.ndim < 2:
        raise ValueError(f"values must be [sample, layer, ...], got shape {np.shape(values)}")
    ranks = np.moveaxis(_ranks(np.moveaxis(means, 1, -1)), -1, 1)  # [resample, layer, *rest]
    return np.stack([(ranks < k).mean(axis=0) for k in range(1, means.shape[1] + 1)])


def set_agreement(values: ArrayLike, chosen: ArrayLike, resamples: int = RESAMPLES, seed: int = SEED) -> float:
    """Share of bootstrap resamples whose ``len(chosen)`` lowest-mean layers are exactly ``chosen``.

    ``values``: ``[sample, layer]``; ``chosen``: layer indices.
    """
    chosen = np.unique(np.asarray(chosen, dtype=int))
    means = resampled_means(values, resamples, seed)
    if means.ndim != 2:
        raise ValueError(f"values must be [sample, layer], got shape {np.shape(values)}")
    inside = np.zeros(means.shape[1], dtype=bool)
    inside[chosen] = True
    return float(((_ranks(means) < len(chosen)) == inside).all(axis=1).mean())


def interval_attrs(level: float = LEVEL, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """The attrs every interval variable carries."""
    return {"interval_level": float(level), "interval_method": BOOTSTRAP_METHOD,
            "interval_seed": int(seed), "interval_resamples": int(resamples)}


def with_intervals(result: xr.Dataset, variable: str, level: float = LEVEL, resamples: int = RESAMPLES,
                   seed: int = SEED) -> xr.Dataset:
    """``result`` with the bootstrap interval of ``variable``'s mean over ``sample`` and its selection stability.

    Adds ``<variable>_low`` and ``<variable>_high`` (``variable``'s dims without ``sample``, e.g.
    ``[layer, group]``) and ``selection_stability`` ``[k, <the same dims>]``: for each ``k``, the
    share of resamples in which each layer's mean is among the ``k`` lowest of its column (what
    the ShortV rule picks from, per group or mode). Each carries :func:`interval_attrs`. Call it
    after the samples are merged; it returns a new Dataset.
    """
    values = result[variable]
    if "sample" not in values.dims or "layer" not in values.dims:
        raise ValueError(f"{variable!r} has dims {values.dims}; intervals need 'sample' and 'layer' dims")
    values = values.transpose("sample", "layer", ...)
    missing = values.isnull().any([d for d in values.dims if d != "sample"])
    if bool(missing.any()):
        samples = [str(s) for s in values.sample.values[missing.values]][:5]
        raise ValueError(f"{variable!r} is NaN for {int(missing.sum())} samples (e.g. {samples}): a sample with "
                         "nothing to measure, such as an empty answer with positions='answer'; drop those rows "
                         "from the data set")
    dims = values.dims[1:]
    low, high = bootstrap_interval(values.values, level, resamples, seed)
    attrs = {**values.attrs, **interval_attrs(level, resamples, seed)}
    stability = stability_by_k(values.values, resamples, seed)
    extra = {
        f"{variable}_low": xr.DataArray(low, dims=dims, attrs={**attrs, "long_name": f"{level:.0%} interval low"}),
        f"{variable}_high": xr.DataArray(high, dims=dims, attrs={**attrs, "long_name": f"{level:.0%} interval high"}),
        "selection_stability": xr.DataArray(
            stability, dims=("k", *dims), coords={"k": np.arange(1, stability.shape[0] + 1)},
            attrs={**interval_attrs(level, resamples, seed), "units": "share of resamples",
                   "long_name": f"share of bootstrap resamples in which the layer is among the k lowest mean "
                                f"{variable}"}),
    }
    return result.assign(extra).assign_attrs(interval_attrs(level, resamples, seed))
