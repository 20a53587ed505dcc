"""Layer Contribution (ShortV) and mode contribution, with a cheap sweep and a plain reference.

For layer ``l`` and an intervention (a token group's update removed, or the layer run in one
mode), the contribution is the divergence between the original model's next-token distribution
and the intervened one at the probe positions (the last prompt position by default), averaged
over those positions. ShortV's Layer Contribution of group ``g`` is the intervention "layer ``l``
leaves group ``g``'s hidden states unchanged": exactly the ``frozen`` mode for that group, whose
other rows equal the original layer's (keys and values are computed from the same input).

**Sweep** (the default): one forward pass keeps every decoder layer's input, output and call
arguments; the intervened output of layer ``l`` is built from them (a row mix for a group, the
mode's fast path for a mode) and only layers ``l+1 ..`` run again. What a model adds between two
layers, outside them (Qwen3-VL's deepstack visual features), is replayed as the pass recorded it.
The vision tower, projector and layers before ``l`` are never recomputed: ``L + K * L(L-1)/2``
decoder-layer passes for ``K`` interventions instead of the naive ``K * (L + 1) * L``.

**On a planned model** (a plan applied, e.g. by ``load_pruned``) every contribution measures
that model: the baseline is the planned model's output, the layers after ``l`` run their
planned modes, and an intervention is relative to layer ``l``'s current mode. So a layer that
already runs ``frozen`` has visual LC (and ``frozen`` contribution) exactly 0, a layer's
contribution for its own mode is exactly 0, and the visual LC of a ``naavit`` or ``composite``
layer is the divergence when its remaining visual update (attention to text and itself, and the
MLP) is removed too, i.e. when it runs ``frozen`` instead. The result's attrs record the plan.

**Reference**: the plain version: for each layer and intervention, a full forward pass of the
model with a forward hook (groups) or the model's plan with layer ``l`` changed (modes), every
plan in its reference implementation. It is what the sweep is tested against and what the cost
benchmark times. A plan that withdraws visual tokens (``visual_keep``) is measured by the
reference's mode contributions only (its withdrawal kept); the sweep and ``layer_contribution``
refuse it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import xarray as xr
from transformers import PreTrainedModel, ProcessorMixin

from eemllm_models import TokenLayout, token_layout
from eemllm_models.apply import applied_plan, current_plan, running
from eemllm_models.families import family_of
from eemllm_models.modes import RowSplit, fast_forward, gather_rows

from .divergence import DIVERGENCES, divergence
from .runner import ProbeInputs, PromptedBatch, run_probe
from .uncertainty import with_intervals

GROUPS = ("visual", "text")
CONTRIBUTION_MODES = ("frozen", "naavit", "composite")
IMPLEMENTATIONS = ("sweep", "reference")


@dataclass
class Trace:
    """One forward pass with every decoder layer's input and output ``[batch, seq, hidden]`` and call kwargs."""

    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    kwargs: list[dict]
    layout: TokenLayout

    def between(self, layer: int) -> torch.Tensor | None:
        """What the model added to layer ``layer``'s output before layer ``layer + 1`` got it (Qwen3-VL's
        deepstack visual features, added outside the layers), ``[batch, seq, hidden]``; None when the
        next layer got the output itself, as in most models."""
        after, before = self.inputs[layer + 1], self.outputs[layer]
        return None if after is before else after - before


def trace(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> Trace:
    """Run ``model`` once (no cache) and keep what each decoder layer received and returned."""
    layers = family_of(model).decoder_layers(model)
    kept = Trace([], [], [], token_layout(model, inputs["input_ids"], inputs.get("attention_mask")))

    def keep_input(module, args, kwargs):
        kept.inputs.append(args[0] if args else kwargs["hidden_states"])
        kept.kwargs.append({**kwargs, **({"attention_mask": args[1]} if len(args) > 1 else {})})

    def keep_output(module, args, kwargs, output):
        kept.outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = [h for layer in layers for h in (layer.register_forward_pre_hook(keep_input, with_kwargs=True),
                                               layer.register_forward_hook(keep_output, with_kwargs=True))]
    try:
        model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return kept


def _log_probs(model: PreTrainedModel, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Log-probabilities ``[batch, n, vocab]`` (float32) at ``positions`` ``[batch, n]`` of last-layer ``hidden``."""
    return torch.log_softmax(family_of(model).readout(model, gather_rows(hidden, positions)).float(), dim=-1)


def _mean_over_positions(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values`` ``[batch, n]`` averaged over the real positions of ``mask`` ``[batch, n]`` -> ``[batch]``."""
    return (values * mask).sum(-1) / mask.sum(-1)


def _group_mask(layout: TokenLayout, group: str) -> torch.Tensor:
    if group == "visual":
        return layout.visual
    if group == "text":
        return layout.text
    raise ValueError(f"unknown token group {group!r}; choose from {GROUPS}")


def leaves_unchanged(current: str, what: str) -> bool:
    """True when intervention ``what`` (a group or a mode) on a layer running mode ``current``
    changes nothing: the layer already runs that mode, or is ``frozen`` and ``what`` removes its
    visual update. Its contribution is then exactly 0."""
    return what == current or (current == "frozen" and what == "visual")


def _intervened_output(model: PreTrainedModel, kept: Trace, split: RowSplit, layer: int, what: str) -> torch.Tensor:
    """Layer ``layer``'s output under intervention ``what`` (a group or a mode), from the trace."""
    if what in GROUPS:
        return torch.where(_group_mask(kept.layout, what)[..., None], kept.inputs[layer], kept.outputs[layer])
    decoder_layer = family_of(model).decoder_layers(model)[layer]
    return fast_forward(decoder_layer, what, kept.layout, split, kept.inputs[layer], **kept.kwargs[layer])


def sweep_contributions(model: PreTrainedModel, batch: PromptedBatch, interventions: tuple[str, ...],
                        divergence_name: str = "kl", kept: Trace | None = None) -> torch.Tensor:
    """Contribution of every decoder layer under each intervention: ``[batch, layer, intervention]``.

    ``interventions`` are token groups (``"visual"``, ``"text"``: that group's update removed) or
    modes (``"frozen"``, ``"naavit"``, ``"composite"``: the layer alone runs in that mode instead
    of its current one). On a model with a plan applied, the baseline is the planned model and
    the layers after ``l`` run their planned modes. ``kept``: the batch's :func:`trace`, if
    already taken.
    """
    layers = family_of(model).decoder_layers(model)
    if current_plan(model).withdraws:
        raise NotImplementedError("the contribution sweep reruns layers that see every visual token; this model's plan "
                                  "withdraws some: use implementation='reference' (mode_contribution)")
    current = current_plan(model).modes
    handle = applied_plan(model)
    kept = trace(model, batch.inputs) if kept is None else kept
    split = RowSplit.from_layout(kept.layout)
    original = _log_probs(model, kept.outputs[-1], batch.positions)
    added = [kept.between(layer) for layer in range(len(layers) - 1)]  # once per batch, not per rerun
    out = torch.zeros(len(batch.rows), len(layers), len(interventions))
    with nullcontext() if handle is None else handle.layer_calls(kept.layout):
        for layer in range(len(layers)):
            for k, what in enumerate(interventions):
                if leaves_unchanged(current[layer], what):
                    continue
                hidden = _intervened_output(model, kept, split, layer, what)
                for later in range(layer + 1, len(layers)):
                    if added[later - 1] is not None:
                        hidden = hidden + added[later - 1]
                    hidden = layers[later](hidden, **kept.kwargs[later])
                    hidden = hidden[0] if isinstance(hidden, tuple) else hidden
                changed = divergence(original, _log_probs(model, hidden, batch.positions), divergence_name)
                out[:, layer, k] = _mean_over_positions(changed, batch.position_mask).cpu()
    return out


def reference_contributions(model: PreTrainedModel, batch: PromptedBatch, interventions: tuple[str, ...],
                            divergence_name: str = "kl", kept: Trace | None = None) -> torch.Tensor:
    """The plain version of :func:`sweep_contributions`: one full forward pass of the model per layer
    and intervention, every plan in its reference implementation (``kept`` is not used)."""
    layers = family_of(model).decoder_layers(model)
    plan = current_plan(model)

    def log_probs() -> torch.Tensor:
        logits = model(**batch.inputs, use_cache=False).logits
        return torch.log_softmax(gather_rows(logits, batch.positions).float(), dim=-1)

    layout = token_layout(model, batch.inputs["input_ids"], batch.inputs.get("attention_mask"))
    with running(model, plan, "reference"):
        original = log_probs()
    out = torch.empty(len(batch.rows), len(layers), len(interventions))
    for layer in range(len(layers)):
        for k, what in enumerate(interventions):
            if what in GROUPS:
                mask = _group_mask(layout, what)[..., None]
                with running(model, plan, "reference"):
                    handle = layers[layer].register_forward_hook(
                        lambda module, args, kwargs, output, mask=mask: torch.where(
                            mask, args[0] if args else kwargs["hidden_states"], output), with_kwargs=True)
                    try:
                        changed = log_probs()
                    finally:
                        handle.remove()
            else:
                modes = list(plan.modes)
                modes[layer] = what
                with running(model, replace(plan, modes=modes), "reference"):  # its visual_keep too
                    changed = log_probs()
            out[:, layer, k] = _mean_over_positions(divergence(original, changed, divergence_name),
                                                    batch.position_mask).cpu()
    return out


def _contributions(implementation: str) -> Callable[..., torch.Tensor]:
    if implementation == "sweep":
        return sweep_contributions
    if implementation == "reference":
        return reference_contributions
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")


def _similarity(kept: Trace) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer and group, the mean cosine similarity of a token's layer input and output and the
    mean relative change ``|out - in| / |in|``: two ``[batch, layer, group]`` tensors."""
    cosine = torch.empty(kept.inputs[0].shape[0], len(kept.inputs), len(GROUPS))
    change = torch.empty_like(cosine)
    for layer, (x, y) in enumerate(zip(kept.inputs, kept.outputs)):
        x, y = x.float(), y.float()
        cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
        rel = (y - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)
        for g, group in enumerate(GROUPS):
            mask = _group_mask(kept.layout, group).float()
            cosine[:, layer, g] = _mean_over_positions(cos, mask).cpu()
            change[:, layer, g] = _mean_over_positions(rel, mask).cpu()
    return cosine, change


def _check_divergence(name: str) -> None:
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; choose one of {DIVERGENCES}")


def layer_contribution(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    dataset,
    samples: int | None = 40,
    seed: int = 0,
    batch_size: int = 8,
    divergence: str = "kl",
    positions: str = "last_prompt",
    prompt_template: str | None = None,
    implementation: str = "sweep",
    checkpoint: str | Path | None = None,
    progress: bool = True,
    **columns: str,
) -> xr.Dataset:
    """ShortV's Layer Contribution of every decoder layer for visual and text tokens, per sample.

    ``dataset``: a ``datasets.Dataset`` with an image and a question column (and an answer column
    for ``positions="answer"``, the teacher-forced average over answer tokens); ``samples`` rows
    are drawn from a ``seed`` permutation (ShortV chose its layers from 40). ``divergence``: see
    :mod:`probes.divergence` (``"kl"`` is ShortV's). ``columns``: ``image_column=``,
    ``question_column=``, ``answer_column=``, ``label_column=`` to rename the columns read.

    Returns an ``xarray.Dataset`` with ``lc`` ``[sample, layer, group]`` (nats), and two cheap
    baselines from the same pass: ``cosine`` (mean cosine similarity of a token's layer input
    and output, ShortV's ablation baseline) and ``relative_change`` (mean ``|out - in| / |in|``).
    """
    _check_divergence(divergence)
    contributions = _contributions(implementation)
    _refuse_withdrawal(model)
    spec = ProbeInputs(dataset, samples, seed, batch_size, positions, prompt_template, **columns)

    def probe(batch: PromptedBatch) -> xr.Dataset:
        kept = trace(model, batch.inputs)
        return _lc_dataset(kept, contributions(model, batch, GROUPS, divergence, kept))

    result = run_probe("layer_contribution", model, processor, spec, probe,
                       {"divergence": divergence, "implementation": implementation}, checkpoint, progress)
    return _finish_lc(result, divergence)


def _refuse_withdrawal(model: PreTrainedModel) -> None:
    if current_plan(model).withdraws:
        raise NotImplementedError("layer_contribution traces every layer's visual rows; this model's plan withdraws "
                                  "visual tokens: measure it with mode_contribution(implementation='reference') "
                                  "(its frozen contribution is the visual Layer Contribution)")


def _lc_dataset(kept: Trace, lc: torch.Tensor) -> xr.Dataset:
    """One batch's ``lc`` ``[batch, layer, group]`` with the cosine and relative-change baselines of its trace."""
    cosine, change = _similarity(kept)
    dims = ("sample", "layer", "group")
    return xr.Dataset({"lc": (dims, lc.numpy()), "cosine": (dims, cosine.numpy()),
                       "relative_change": (dims, change.numpy())},
                      coords={"layer": range(lc.shape[1]), "group": list(GROUPS)})


def _finish_lc(result: xr.Dataset, divergence: str) -> xr.Dataset:
    result["lc"].attrs = {"units": "nats", "long_name": f"Layer Contribution ({divergence})"}
    return with_intervals(result, "lc")  # lc_low/lc_high [layer, group], selection_stability [k, layer, group]


def _modes_dataset(values: torch.Tensor, modes: tuple[str, ...]) -> xr.Dataset:
    """One batch's ``contribution`` ``[batch, layer, mode]``."""
    return xr.Dataset({"contribution": (("sample", "layer", "mode"), values.numpy())},
                      coords={"layer": range(values.shape[1]), "mode": list(modes)})


def _finish_modes(result: xr.Dataset, divergence: str) -> xr.Dataset:
    result["contribution"].attrs = {"units": "nats", "long_name": f"mode contribution ({divergence})"}
    return with_intervals(result, "contribution")  # contribution_low/_high [layer, mode], selection_stability


def _check_modes(modes: tuple[str, ...]) -> None:
    unknown = [m for m in modes if m not in CONTRIBUTION_MODES]
    if unknown or not modes:
        raise ValueError(f"modes must be a non-empty selection of {CONTRIBUTION_MODES}, got {list(modes)}")


def mode_contribution(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    dataset,
    modes: tuple[str, ...] = CONTRIBUTION_MODES,
    samples: int | None = 40,
    seed: int = 0,
    batch_size: int = 8,
    divergence: str = "kl",
    positions: str = "last_prompt",
    prompt_template: str | None = None,
    implementation: str = "sweep",
    checkpoint: str | Path | None = None,
    progress: bool = True,
    **columns: str,
) -> xr.Dataset:
    """Contribution of each decoder layer's visual-token work per mode: the divergence when that
    layer alone runs in ``mode`` (``frozen`` equals the visual Layer Contribution).

    Same arguments as :func:`layer_contribution`; returns ``contribution`` ``[sample, layer, mode]``.
    """
    _check_divergence(divergence)
    _check_modes(tuple(modes))
    contributions = _contributions(implementation)
    spec = ProbeInputs(dataset, samples, seed, batch_size, positions, prompt_template, **columns)

    def probe(batch: PromptedBatch) -> xr.Dataset:
        return _modes_dataset(contributions(model, batch, tuple(modes), divergence), tuple(modes))

    result = run_probe("mode_contribution", model, processor, spec, probe,
                       {"divergence": divergence, "implementation": implementation}, checkpoint, progress)
    return _finish_modes(result, divergence)


def layer_and_mode_contribution(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    dataset,
    modes: tuple[str, ...] = CONTRIBUTION_MODES,
    samples: int | None = 40,
    seed: int = 0,
    batch_size: int = 8,
    divergence: str = "kl",
    positions: str = "last_prompt",
    prompt_template: str | None = None,
    implementation: str = "sweep",
    checkpoint: str | Path | None = None,
    progress: bool = True,
    **columns: str,
) -> tuple[xr.Dataset, xr.Dataset]:
    """:func:`layer_contribution` and :func:`mode_contribution` of the same samples, from one pass per batch:
    ``(lc, modes)``, each as those functions return it.

    One trace per batch serves both, and the ``frozen`` contribution is the visual Layer Contribution's
    intervention (the layer leaves the visual rows unchanged), measured once: for the default three modes
    the sweep reruns the later layers for four interventions instead of five. Same arguments as
    :func:`mode_contribution`; ``checkpoint`` holds the batches of both.
    """
    _check_divergence(divergence)
    _check_modes(tuple(modes))
    _refuse_withdrawal(model)
    contributions = _contributions(implementation)
    interventions = (*GROUPS, *(m for m in modes if m != "frozen"))
    columns_of = [interventions.index("visual" if m == "frozen" else m) for m in modes]
    spec = ProbeInputs(dataset, samples, seed, batch_size, positions, prompt_template, **columns)

    def probe(batch: PromptedBatch) -> xr.Dataset:
        kept = trace(model, batch.inputs)
        values = contributions(model, batch, interventions, divergence, kept)
        return xr.merge([_lc_dataset(kept, values[..., :len(GROUPS)]),
                         _modes_dataset(values[..., columns_of], tuple(modes))])

    both = run_probe("layer_and_mode_contribution", model, processor, spec, probe,
                     {"divergence": divergence, "implementation": implementation}, checkpoint, progress)
    lc, per_mode = both[["lc", "cosine", "relative_change"]], both[["contribution"]]
    lc.attrs, per_mode.attrs = ({**both.attrs, "probe": name} for name in ("layer_contribution", "mode_contribution"))
    return _finish_lc(lc, divergence), _finish_modes(per_mode, divergence)
