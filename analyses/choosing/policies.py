"""Policies: from probe results to an EfficiencyPlan, recorded in the plan's provenance.

Each policy ranks the decoder layers by a redundancy signal (lowest first) and freezes the
visual tokens of the first ``k``:

* ``shortv``: the lowest mean visual Layer Contribution (ShortV's rule);
* ``cosine``: the highest mean input/output cosine similarity of visual tokens (ShortV's
  ablation baseline);
* ``random``: a seeded random choice (the floor every signal must beat).

From mode contributions (``probes.mode_contribution``), mixing ``frozen``, ``naavit`` and
``composite`` per layer:

* ``budget``: reach a FLOPs target, cheapest loss per saved FLOP first;
* ``greedy``: the same order, each change kept only if a held-out accuracy stays within a tolerance
  (optionally stopping once a FLOPs target is reached).

``shortv_within_tolerance`` picks ShortV's ``k`` as the largest whose measured accuracy drop is
within a tolerance.

Token withdrawal and pruning (a plan's ``visual_keep``):

* ``withdraw_plan``: VTW's rule on a ``probes.withdrawal_contribution`` result: withdraw every visual
  token from the earliest layer whose withdrawal contribution stays under a tolerance;
* ``budget`` with ``withdrawal=`` that result: withdrawal from a layer on joins the layer modes as
  one more change, ranked by its measured loss per saved FLOP;
* ``prune_tokens_plan``: FastV's plan, keeping the most attended share of visual tokens from a layer on.

Held out: the ``accuracy`` that ``greedy`` and ``shortv_within_tolerance`` choose by must be measured
on a *selection* set (shapes-vqa ``validation``), never on the set the chosen plan is finally scored on
(``test``); ``analyses.choosing.compare.accuracy_on(..., evaluation=...)`` checks the two are disjoint. The
plan's provenance records the selection set (``selection``: dataset, split, n) next to every
accuracy, and its FLOPs ratio under its named convention (``flops.flops_provenance``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import xarray as xr
from transformers import PretrainedConfig

from eemllm_models import EfficiencyPlan

from analyses.measuring.flops import DecoderShape, TokenCounts, flops_provenance, flops_ratio, layer_flops
from analyses.choosing.heldout import describe

POLICIES = ("shortv", "cosine", "random")
"""Policies that freeze the visual tokens of ``k`` ranked layers."""


def _probe_provenance(result: xr.Dataset) -> dict:
    """The probe result's identifying attrs, as plain JSON values (netCDF gives numpy scalars)."""
    attrs = result.attrs
    return {f"probe_{key}": getattr(attrs[key], "item", lambda: attrs[key])()
            for key in ("model", "dataset", "samples", "seed", "divergence") if key in attrs}


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
    provenance = {"policy": policy, "k": k, "ranking": ranking, **_probe_provenance(lc)}
    if policy == "random":
        provenance["policy_seed"] = seed
    return EfficiencyPlan.from_layers(n_layers, ranking[:k], "frozen", **provenance)


def _check_mode_result(modes: xr.Dataset) -> None:
    if modes.attrs.get("probe") != "mode_contribution" or "contribution" not in modes:
        raise ValueError("the budget and greedy policies need a mode_contribution result (probes.mode_contribution, "
                         f"or mode_contribution.nc from `eemllm probe`); got a {modes.attrs.get('probe', 'non-probe')!r}"
                         " dataset")


def change_candidates(modes: xr.Dataset, config: PretrainedConfig, tokens: TokenCounts) -> pd.DataFrame:
    """Every single-layer change ``(layer, mode)`` with its mean contribution and the decoder prefill
    FLOPs it saves, cheapest loss per saved FLOP first.

    Columns: ``layer``, ``mode``, ``contribution`` (mean over samples, nats), ``saved_flops``,
    ``cost`` (contribution per saved GFLOP). Changes that save nothing are left out.
    """
    _check_mode_result(modes)
    shape = DecoderShape.from_config(config)
    if modes.sizes["layer"] != shape.layers:
        raise ValueError(f"the mode contributions cover {modes.sizes['layer']} layers but the config has "
                         f"{shape.layers}; probe this model (`eemllm probe --probes modes`)")
    full = sum(layer_flops(shape, tokens, "full").values())
    mean = modes.contribution.mean("sample")
    rows = [{"layer": int(layer), "mode": str(mode), "contribution": float(mean.sel(layer=layer, mode=mode)),
             "saved_flops": full - sum(layer_flops(shape, tokens, str(mode)).values())}
            for layer in modes.layer.values for mode in modes["mode"].values]
    frame = pd.DataFrame(rows)
    frame = frame[frame.saved_flops > 0].copy()
    frame["cost"] = frame.contribution.clip(lower=0) / (frame.saved_flops / 1e9)
    return frame.sort_values(["cost", "layer"], kind="stable").reset_index(drop=True)


def withdrawal_candidates(result: xr.Dataset, config: PretrainedConfig, tokens: TokenCounts) -> pd.DataFrame:
    """Every withdrawal "all visual tokens leave from layer ``l`` on" of a ``probes.withdrawal_contribution``
    result as a change of :func:`change_candidates`' form (``mode`` ``"withdraw"``): its mean contribution and
    the decoder prefill FLOPs it saves against the original model (its later layers see text only)."""
    _check_withdrawal_result(result)
    shape = DecoderShape.from_config(config)
    n_layers = int(result.attrs.get("n_layers", shape.layers))
    if n_layers != shape.layers:
        raise ValueError(f"the withdrawal contributions are of a {n_layers}-layer model but the config has "
                         f"{shape.layers} layers; probe this model (probes.withdrawal_contribution)")
    text = TokenCounts(tokens.text_before, 0, tokens.text_after)
    full = sum(layer_flops(shape, tokens, "full").values())
    saved_per_layer = full - sum(layer_flops(shape, text, "full").values())
    mean = result.withdrawal_contribution.mean("sample")
    frame = pd.DataFrame([{"layer": int(layer), "mode": "withdraw", "contribution": float(mean.sel(layer=layer)),
                           "saved_flops": (shape.layers - int(layer)) * saved_per_layer}
                          for layer in mean.layer.values])
    frame = frame[frame.saved_flops > 0].copy()
    frame["cost"] = frame.contribution.clip(lower=0) / (frame.saved_flops / 1e9)
    return frame.reset_index(drop=True)


def _mixed_plan(n_layers: int, chosen: dict[int, str], withdrawn_from: int | None) -> EfficiencyPlan:
    """The modes of ``chosen`` with every visual token withdrawn from ``withdrawn_from`` on (None: kept);
    layers after the withdrawal run ``full`` (a mode changes nothing without visual tokens)."""
    if withdrawn_from is None:
        return EfficiencyPlan.from_layers(n_layers, chosen)
    kept_modes = {i: m for i, m in chosen.items() if i < withdrawn_from}
    keep = EfficiencyPlan.withdraw(n_layers, withdrawn_from).visual_keep
    return EfficiencyPlan.from_layers(n_layers, kept_modes).with_visual_keep(keep)


def budget_plan(modes: xr.Dataset, config: PretrainedConfig, tokens: TokenCounts, target: float,
                withdrawal: xr.Dataset | None = None) -> EfficiencyPlan:
    """Reach decoder prefill FLOPs of at most ``target`` × the original by mixing ``frozen``, ``naavit``
    and ``composite`` per layer (and, given ``withdrawal``, VTW withdrawal from a layer on), cheapest loss
    first.

    Changes are taken in :func:`change_candidates` order; a layer takes a later change only when it
    saves more than the one it has. ``modes`` is a ``probes.mode_contribution`` result, ``tokens``
    the prompt's token counts (:meth:`TokenCounts.from_layout`). ``withdrawal``: a
    ``probes.withdrawal_contribution`` result of the same model, divergence and positions, whose
    :func:`withdrawal_candidates` join the order; a withdrawal is taken only when it starts earlier than
    the one the plan has, and layer modes at or after it are dropped (its layers see no visual token).
    """
    if not 0 < target <= 1:
        raise ValueError(f"the FLOPs target is a share of the original in (0, 1], got {target}")
    candidates = change_candidates(modes, config, tokens)
    if withdrawal is not None:
        if withdrawal.attrs.get("divergence") != modes.attrs.get("divergence"):
            raise ValueError(f"the withdrawal contributions use divergence {withdrawal.attrs.get('divergence')!r} but "
                             f"the mode contributions {modes.attrs.get('divergence')!r}; probe both with the same one")
        candidates = (pd.concat([candidates, withdrawal_candidates(withdrawal, config, tokens)], ignore_index=True)
                      .sort_values(["cost", "layer"], kind="stable").reset_index(drop=True))
    n_layers = modes.sizes["layer"]
    chosen: dict[int, str] = {}
    saved: dict[int, float] = {}
    withdrawn_from: int | None = None
    plan = EfficiencyPlan.empty(n_layers)
    for change in candidates.itertuples():
        if flops_ratio(config, plan, tokens) <= target:
            break
        if change.mode == "withdraw":
            if withdrawn_from is not None and change.layer >= withdrawn_from:
                continue
            withdrawn_from = change.layer
        elif (withdrawn_from is not None and change.layer >= withdrawn_from
              or change.saved_flops <= saved.get(change.layer, 0.0)):
            continue
        else:
            chosen[change.layer], saved[change.layer] = change.mode, change.saved_flops
        plan = _mixed_plan(n_layers, chosen, withdrawn_from)
    ratio = flops_ratio(config, plan, tokens)
    if ratio > target:
        raise ValueError(f"no mix of modes reaches {target:.0%} of the original FLOPs for these token counts "
                         f"(the cheapest plan found costs {ratio:.0%}); choose a higher target")
    mixed = {} if withdrawal is None else {"withdrawn_from": withdrawn_from}
    return plan.with_provenance(policy="budget", target=target, **mixed, **flops_provenance(config, plan, tokens),
                                **_probe_provenance(modes))


def _selection(accuracy: Callable[[EfficiencyPlan], float]) -> dict:
    """What ``accuracy`` measures on (dataset, split, n), when it says
    (``analyses.choosing.compare.accuracy_on``'s does)."""
    data = getattr(accuracy, "data", None)
    return {"selection": describe(data)} if data is not None else {}


def greedy_plan(modes: xr.Dataset, config: PretrainedConfig, tokens: TokenCounts,
                accuracy: Callable[[EfficiencyPlan], float], tolerance: float = 0.01,
                max_trials: int | None = None, target: float | None = None) -> EfficiencyPlan:
    """Accuracy-checked greedy search: try the single-layer changes cheapest loss first and keep each
    one whose plan (with the changes kept so far) stays within ``tolerance`` of the original accuracy.

    ``accuracy(plan)`` measures a plan on a held-out *selection* split (e.g.
    ``analyses.choosing.compare.accuracy_on`` on shapes-vqa ``validation``); report the result on another.
    ``target``: stop as soon as the plan's decoder FLOPs ratio is at most this share of the original
    (default: try every change). A layer keeps the first change accepted for it. The provenance
    lists every trial and its accuracy, the final plan's ``accuracy`` on the selection set (and that
    set), whether the ``target`` was reached, and the FLOPs ratio under its convention.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance is an accuracy drop (>= 0), got {tolerance}")
    if target is not None and not 0 < target <= 1:
        raise ValueError(f"the FLOPs target is a share of the original in (0, 1], got {target}")
    candidates = change_candidates(modes, config, tokens)
    n_layers = modes.sizes["layer"]
    baseline = accuracy(EfficiencyPlan.empty(n_layers))
    chosen: dict[int, str] = {}
    trials = []
    reached = baseline
    for change in candidates.itertuples():
        if target is not None and flops_ratio(config, EfficiencyPlan.from_layers(n_layers, chosen), tokens) <= target:
            break
        if max_trials is not None and len(trials) >= max_trials:
            break
        if change.layer in chosen:
            continue
        trial = EfficiencyPlan.from_layers(n_layers, {**chosen, change.layer: change.mode})
        score = accuracy(trial)
        kept = baseline - score <= tolerance
        trials.append({"layer": change.layer, "mode": change.mode, "accuracy": score, "kept": kept})
        if kept:
            chosen[change.layer] = change.mode
            reached = score
    plan = EfficiencyPlan.from_layers(n_layers, chosen)
    flops = flops_provenance(config, plan, tokens)
    stop = {} if target is None else {"target": target, "reached_target": flops["flops_ratio"] <= target}
    return plan.with_provenance(policy="greedy", tolerance=tolerance, baseline_accuracy=baseline, accuracy=reached,
                                **_selection(accuracy), **stop, trials=trials, **flops, **_probe_provenance(modes))


def shortv_within_tolerance(lc: xr.Dataset, accuracy: Callable[[EfficiencyPlan], float],
                            tolerance: float = 0.01) -> EfficiencyPlan:
    """ShortV's rule with ``k`` chosen by measurement: the largest ``k`` whose plan's accuracy stays
    within ``tolerance`` of the original (every ``k`` is measured; the provenance lists them, the
    chosen plan's ``accuracy``, the ``baseline_accuracy`` and the ``selection`` set they were
    measured on). ``accuracy`` must measure on a held-out selection split (see :func:`greedy_plan`)."""
    if tolerance < 0:
        raise ValueError(f"tolerance is an accuracy drop (>= 0), got {tolerance}")
    n_layers = lc.sizes["layer"]
    measured = {k: accuracy(freeze_plan(lc, k)) for k in range(n_layers + 1)}
    best = max(k for k, score in measured.items() if measured[0] - score <= tolerance)
    return freeze_plan(lc, best).with_provenance(tolerance=tolerance, baseline_accuracy=measured[0],
                                                 accuracy=measured[best], **_selection(accuracy),
                                                 accuracy_by_k={str(k): v for k, v in measured.items()})


def _check_withdrawal_result(result: xr.Dataset) -> None:
    if result.attrs.get("probe") != "withdrawal_contribution" or "withdrawal_contribution" not in result:
        raise ValueError("withdraw_plan needs a withdrawal_contribution result (probes.withdrawal_contribution); got a "
                         f"{result.attrs.get('probe', 'non-probe')!r} dataset")


def _with_flops(plan: EfficiencyPlan, config: PretrainedConfig | None, tokens: TokenCounts | None) -> EfficiencyPlan:
    """``plan`` with its FLOPs ratios in its provenance when ``config`` and ``tokens`` are given."""
    if (config is None) != (tokens is None):
        raise ValueError("pass both config and tokens to record the plan's FLOPs, or neither")
    return plan if config is None else plan.with_provenance(**flops_provenance(config, plan, tokens))


def withdraw_plan(result: xr.Dataset, tolerance: float, upper: bool = False, config: PretrainedConfig | None = None,
                  tokens: TokenCounts | None = None) -> EfficiencyPlan:
    """VTW: withdraw every visual token from the earliest layer ``l`` whose withdrawal contribution, and that of
    every deeper layer, is at most ``tolerance`` (nats).

    ``result``: a ``probes.withdrawal_contribution`` result (``withdrawal_contribution`` ``[sample, layer]``
    over layers 1 .. L-1). The contribution compared is the mean over samples, or with ``upper`` the
    bootstrap interval's upper end (``withdrawal_contribution_high``). On a curve that falls with depth
    this is VTW's earliest layer under the threshold; requiring the deeper layers too keeps one lucky
    dip from withdrawing early. ``config`` and ``tokens``: record the plan's FLOPs ratios
    (:func:`~analyses.measuring.flops.flops_provenance`). The provenance names the policy, the
    tolerance, the layer and its contribution, and the probe result.
    """
    _check_withdrawal_result(result)
    if tolerance < 0:
        raise ValueError(f"tolerance is a divergence in nats (>= 0), got {tolerance}")
    if upper and "withdrawal_contribution_high" not in result:
        raise ValueError("upper=True needs withdrawal_contribution_high (probes.withdrawal_contribution adds it)")
    values = result.withdrawal_contribution_high if upper else result.withdrawal_contribution.mean("sample")
    layers = [int(layer) for layer in values.layer.values]
    scores = [float(values.sel(layer=layer)) for layer in layers]
    n_layers = int(result.attrs.get("n_layers", layers[-1] + 1))
    under = [all(score <= tolerance for score in scores[i:]) for i in range(len(layers))]
    if not any(under):
        raise ValueError(f"no layer's withdrawal contribution stays under {tolerance} nats (the last layer's is "
                         f"{scores[-1]:.4g}); raise the tolerance")
    chosen = under.index(True)
    plan = EfficiencyPlan.withdraw(n_layers, layers[chosen]).with_provenance(
        policy="withdraw", tolerance=tolerance, from_layer=layers[chosen], contribution=scores[chosen],
        contribution_statistic="interval high" if upper else "mean", **_probe_provenance(result))
    return _with_flops(plan, config, tokens)


def prune_tokens_plan(n_layers: int, layer: int, keep: float, ranking: str = "attention",
                      config: PretrainedConfig | None = None, tokens: TokenCounts | None = None) -> EfficiencyPlan:
    """FastV: from ``layer`` on keep the share ``keep`` of each prompt's visual tokens that the last prompt position
    attends to most at layer ``layer - 1`` (FastV's K = 2, R = 50% is ``prune_tokens_plan(n, 2, 0.5)``);
    ``ranking="stride"`` keeps evenly spaced tokens instead (a control). ``config`` and ``tokens``: record the
    plan's FLOPs ratios (:func:`~analyses.measuring.flops.flops_provenance`)."""
    if not 0 <= keep < 1:
        raise ValueError(f"keep is the share of visual tokens kept, in [0, 1), got {keep}; 1 prunes nothing")
    plan = EfficiencyPlan.prune_tokens(n_layers, layer, keep, ranking).with_provenance(
        policy="fastv", from_layer=layer, keep=keep)
    return _with_flops(plan, config, tokens)
