"""Apply an EfficiencyPlan to a loaded HF model in place, and undo it.

The model keeps its class, weights and module tree (so ``generate()``, ``save_pretrained()``,
processors and harnesses keep working). A forward pre-hook on the top model reads ``input_ids``
and the padding mask of each call and finds the visual positions; each non-``full`` decoder layer
gets an instance-level ``forward`` that runs its mode. Calls whose tokens include no image token
(a text-only prompt, or a decoding step with the KV cache) run every layer as usual.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial

import torch
from transformers import PreTrainedModel

from .families import family_of
from .layout import TokenLayout
from .modes import RowSplit, fast_forward, reference_forward
from .plan import EfficiencyPlan

logger = logging.getLogger(__name__)
IMPLEMENTATIONS = ("fast", "reference")
CONFIG_KEY = "eemllm_plan"


def token_layout(model: PreTrainedModel, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> TokenLayout:
    """The :class:`TokenLayout` of a batch for ``model``, from the model's own image token ids."""
    return TokenLayout.from_input_ids(input_ids, family_of(model).visual_token_ids(model.config), attention_mask)


@dataclass
class _CallState:
    """What the current forward call's layers need: its layout and row split (None: run as usual)."""

    layout: TokenLayout | None = None
    split: RowSplit | None = None


@dataclass
class AppliedPlan:
    """Handle of a plan applied to a model; :meth:`remove` restores the model exactly."""

    model: PreTrainedModel
    plan: EfficiencyPlan
    implementation: str
    _layers: list[torch.nn.Module] = field(default_factory=list)
    _hook: torch.utils.hooks.RemovableHandle | None = None

    def remove(self) -> None:
        """Undo the plan: original layer forwards, no hook, no plan in the config."""
        for layer in self._layers:
            del layer.forward
        self._layers.clear()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if getattr(self.model, "_eemllm_applied", None) is self:
            del self.model._eemllm_applied
            if hasattr(self.model.config, CONFIG_KEY):
                delattr(self.model.config, CONFIG_KEY)

    def __enter__(self) -> AppliedPlan:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def applied_plan(model: PreTrainedModel) -> AppliedPlan | None:
    """The plan currently applied to ``model``, if any."""
    return getattr(model, "_eemllm_applied", None)


def apply_plan(model: PreTrainedModel, plan: EfficiencyPlan, implementation: str = "fast") -> AppliedPlan:
    """Run each decoder layer of ``model`` in ``plan``'s mode for visual tokens; returns the undo handle.

    ``implementation`` is ``"fast"`` (does less work; the default) or ``"reference"`` (masks and
    put-back rows; for checking). The plan is recorded in ``model.config.eemllm_plan`` while applied.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if applied_plan(model) is not None:
        raise ValueError("a plan is already applied to this model; remove it first (handle.remove())")
    family = family_of(model)
    layers = family.decoder_layers(model)
    plan.check_layers(len(layers), type(model).__name__)
    token_ids = family.visual_token_ids(model.config)
    state = _CallState()
    handle = AppliedPlan(model, plan, implementation)

    def read_layout(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("a model with an eemllm plan needs input_ids (to find the visual tokens); "
                             "pass input_ids instead of inputs_embeds")
        mask = kwargs.get("attention_mask")
        mask = None if mask is None or mask.dim() != 2 else mask[:, -input_ids.shape[1]:]
        layout = TokenLayout.from_input_ids(input_ids, token_ids, mask)
        if bool(layout.visual.any()):
            state.layout, state.split = layout, RowSplit.from_layout(layout)
        else:
            state.layout = state.split = None
            if input_ids.shape[1] > 1:
                logger.info("eemllm: no image tokens in this input; the plan changes nothing for it")

    for layer, mode in zip(layers, plan.modes):
        if mode == "full":
            continue
        layer.forward = partial(_mode_forward, layer, layer.forward, mode, state, implementation)
        handle._layers.append(layer)
    handle._hook = model.register_forward_pre_hook(read_layout, with_kwargs=True)
    model._eemllm_applied = handle
    setattr(model.config, CONFIG_KEY, plan.to_dict())
    return handle


def _mode_forward(layer, original, mode: str, state: _CallState, implementation: str,
                  hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if state.layout is None:
        return original(hidden_states, *args, **kwargs)
    if state.layout.visual.shape != hidden_states.shape[:2]:
        raise ValueError(
            f"the layer got {tuple(hidden_states.shape[:2])} tokens but the input_ids had "
            f"{tuple(state.layout.visual.shape)}; call the model with input_ids of the full sequence"
        )
    if args:
        kwargs["attention_mask"] = args[0]
    if implementation == "reference":
        return reference_forward(layer, original, mode, state.layout, hidden_states, **kwargs)
    return fast_forward(layer, mode, state.layout, state.split, hidden_states, **kwargs)
