"""Report figures (seaborn on ``matplotlib.figure.Figure`` objects): no pyplot state, no display needed.

Each function takes probe results (``xarray.Dataset``), a plan or a tidy frame and returns a
``Figure``; :func:`png_bytes` renders one to PNG with the Agg canvas. Nothing here touches the
global backend, so notebooks that chose ``inline`` keep it.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pandas as pd
import seaborn as sns
import xarray as xr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, ListedColormap, LogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from eemllm_models import EfficiencyPlan
from probes import uncertainty
from eemllm_models.plan import MODES

MODE_COLOURS = {"full": "#d9d9d9", "frozen": "#4c72b0", "naavit": "#dd8452", "composite": "#55a868"}
"""One colour per layer mode, shared by the plan strip and the report's legend."""
POLICY_ORDER = ("shortv", "cosine", "random", "text", "budget", "greedy")
FLOOR = 1e-12
"""Layer Contribution values are drawn on a log scale; exact zeros are drawn at this floor."""


@contextmanager
def _style() -> Iterator[None]:
    """Seaborn's whitegrid look for the figures made inside, without changing global rcParams."""
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.9):
        yield


def png_bytes(figure: Figure, dpi: int = 110) -> bytes:
    """The figure rendered to PNG bytes (Agg canvas)."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, facecolor="white")
    return buffer.getvalue()


def _with_intervals(result: xr.Dataset, variable: str) -> xr.Dataset:
    if f"{variable}_low" in result and f"{variable}_high" in result:
        return result
    return uncertainty.with_intervals(result, variable)


def _mean_with_band(ax, result: xr.Dataset, variable: str, dim: str, order: list[str],
                    colours: dict[str, str] | None = None) -> None:
    """One line per ``dim`` entry: the mean over samples of ``variable`` ``[sample, layer, dim]`` and a band
    from its ``<variable>_low``/``_high`` interval (log-safe: clipped at :data:`FLOOR`)."""
    result = _with_intervals(result, variable)
    mean = result[variable].mean("sample")
    palette = dict(zip(order, sns.color_palette(n_colors=len(order))))
    for name in order:
        colour = (colours or {}).get(name, palette[name])
        at = {dim: name}
        ax.plot(result.layer.values, mean.sel(at).clip(min=FLOOR).values, marker="o", color=colour, label=name)
        ax.fill_between(result.layer.values, result[f"{variable}_low"].sel(at).clip(min=FLOOR).values,
                        result[f"{variable}_high"].sel(at).clip(min=FLOOR).values, color=colour, alpha=0.25,
                        linewidth=0)
    ax.legend(title=dim, fontsize=8)


def lc_figure(lc: xr.Dataset) -> Figure:
    """Layer Contribution per layer: mean over samples by group with its bootstrap interval as a band
    (``lc_low``/``lc_high``, computed when absent; log scale) and the mean as a group × layer heatmap.
    ``lc``: ``lc`` ``[sample, layer, group]``."""
    mean = lc.lc.mean("sample").clip(min=FLOOR).transpose("group", "layer").to_pandas()
    groups = [g for g in ("visual", "text") if g in set(map(str, lc.group.values))]
    level = _with_intervals(lc, "lc").lc_low.attrs.get("interval_level", uncertainty.LEVEL)
    with _style():
        figure = Figure(figsize=(11, 3.6), layout="constrained")
        line, heat = figure.subplots(1, 2, width_ratios=(1.1, 1))
        _mean_with_band(line, lc, "lc", "group", groups)
        line.set_yscale("log")
        line.set(title=f"Layer Contribution per layer (mean, {level:.0%} bootstrap band)", xlabel="layer",
                 ylabel=f"LC ({lc.attrs.get('divergence', '')})")
        sns.heatmap(mean, norm=LogNorm(vmin=float(mean.values.min()), vmax=float(mean.values.max())),
                    cmap="mako_r", ax=heat, cbar_kws={"label": "mean LC (log)"}, linewidths=0.3)
        heat.set(title="mean LC: group × layer", xlabel="layer", ylabel="")
    return figure


def attention_figure(attention: xr.Dataset) -> Figure:
    """Per-statistic layer × head heatmaps of the attention statistics (mean over samples; each panel
    has its own colour scale from 0).

    ``attention``: variables ``[sample, layer, head]`` and ``entropy`` ``[sample, layer, head, query_group]``.
    """
    panels: list[tuple[str, str, xr.DataArray]] = []
    for name, variable in attention.data_vars.items():
        mean = variable.mean("sample")
        title = name.replace("_", " ").replace(" to ", " → ")
        if "query_group" in mean.dims:
            panels += [(f"{title} ({group} queries)", "entropy (nats)", mean.sel(query_group=group))
                       for group in mean.query_group.values]
        else:
            panels.append((title, "share of attention mass", mean))
    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    n_layers = attention.sizes["layer"]
    with _style():
        figure = Figure(figsize=(3.2 * columns, (0.16 * n_layers + 1.2) * rows), layout="constrained")
        axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
        for ax, (title, unit, values) in zip(axes, panels):
            sns.heatmap(values.transpose("layer", "head").to_pandas(), cmap="rocket_r", ax=ax, vmin=0.0,
                        cbar_kws={"shrink": 0.8, "label": unit})
            ax.set_title(title, fontsize=9)
            ax.tick_params(labelsize=7)
        for ax in axes[len(panels):]:
            ax.set_visible(False)
    return figure


def modes_figure(modes: xr.Dataset) -> Figure:
    """Contribution of each layer when only it runs each mode (mean over samples with its bootstrap
    interval as a band, log scale).

    ``modes``: ``contribution`` ``[sample, layer, mode]`` (and ``contribution_low``/``_high``)."""
    with _style():
        figure = Figure(figsize=(8, 3.4), layout="constrained")
        ax = figure.subplots()
        _mean_with_band(ax, modes, "contribution", "mode", [str(m) for m in modes["mode"].values], MODE_COLOURS)
        ax.set_yscale("log")
        ax.set(title="Mode contribution: one layer changed at a time", xlabel="layer",
               ylabel="divergence from the original")
    return figure


def plan_figure(plan: EfficiencyPlan) -> Figure:
    """The plan as a strip of decoder layers, one cell per layer coloured by its mode."""
    codes = np.array([[MODES.index(m) for m in plan.modes]])
    with _style():
        figure = Figure(figsize=(max(6.0, 0.32 * plan.n_layers + 1.5), 1.5), layout="constrained")
        ax = figure.subplots()
        cmap = ListedColormap([MODE_COLOURS[m] for m in MODES])
        ax.pcolormesh(codes, cmap=cmap, norm=BoundaryNorm(np.arange(len(MODES) + 1) - 0.5, len(MODES)),
                      edgecolors="white", linewidth=1.5)
        step = 1 if plan.n_layers <= 40 else 4
        ax.set_xticks(np.arange(0, plan.n_layers, step) + 0.5, [str(i) for i in range(0, plan.n_layers, step)],
                      fontsize=8)
        ax.set_yticks([])
        ax.set_xlabel("decoder layer")
        ax.grid(False)
        used = [m for m in MODES if m in plan.modes]
        ax.legend(handles=[Patch(color=MODE_COLOURS[m], label=f"{m} ({plan.modes.count(m)})") for m in used],
                  loc="lower center", bbox_to_anchor=(0.5, 1.02), ncol=len(used), frameon=False, fontsize=8)
    return figure


def tradeoff_figure(comparison: pd.DataFrame, chosen: tuple[float, float] | None = None) -> Figure:
    """Accuracy against decoder prefill FLOPs ratio, one line per policy (random: mean ± sd over seeds).

    ``comparison``: columns ``policy``, ``k``, ``flops_ratio``, ``accuracy`` (an ``original`` row is
    drawn as a star at its point); ``chosen``: ``(flops_ratio, accuracy)`` of the report's plan.
    """
    original = comparison[comparison.policy == "original"]
    policies = comparison[comparison.policy != "original"]
    order = [p for p in POLICY_ORDER if p in set(policies.policy)]
    order += sorted(set(policies.policy) - set(order))
    with _style():
        figure = Figure(figsize=(7.5, 4.4), layout="constrained")
        ax = figure.subplots()
        sns.lineplot(policies, x="flops_ratio", y="accuracy", hue="policy", hue_order=order, style="policy",
                     style_order=order, markers=True, dashes=False, estimator="mean", errorbar="sd", ax=ax)
        if len(original):
            ax.scatter(original.flops_ratio, original.accuracy, marker="*", s=220, color="black", zorder=5,
                       label="original")
        if chosen is not None:
            ax.scatter([chosen[0]], [chosen[1]], marker="D", s=90, facecolor="none", edgecolor="crimson",
                       linewidth=2, zorder=6, label="chosen plan")
        ax.set(title="Accuracy vs decoder prefill FLOPs", xlabel="decoder prefill FLOPs / original",
               ylabel="accuracy")
        ax.legend(fontsize=8)
    return figure
