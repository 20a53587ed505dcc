"""Apply an EfficiencyPlan to a loaded HF model in place, and undo it.

The model keeps its class, weights and module tree (so ``generate()``, ``save_pretrained()``,
processors and harnesses keep working). A forward pre-hook on the top model reads ``input_ids``
and the padding mask of each call, finds the visual positions and opens the call's
:class:`~eemllm_models.modes.CallCache`; a forward hook that runs even when the call raises drops
it. Each non-``full`` decoder layer gets an instance-level ``forward`` that runs its mode. Calls
whose tokens include no image token (a text-only prompt, or a decoding step with the KV cache)
run every layer as usual. The layout is read from a CPU copy of ``input_ids`` (one copy per call;
decoding steps of one token skip it), so no layer waits on the device to size its tensors.

A plan whose ``visual_keep`` drops also wraps the layers from the layer before its first drop on; a
call over a prompt with image tokens then opens a :class:`~eemllm_models.withdrawal.PromptCall`
(ranking, removal, the short sequence), and a decoding step over a KV cache that prompt filled a
:class:`~eemllm_models.withdrawal.DecodeCall` (see :mod:`eemllm_models.withdrawal`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from transformers import PreTrainedModel

from .anatomy import recognise_style
from .families import family_of
from .layout import TokenLayout
from .modes import (NAAVIT_KERNELS, CallCache, NaavitBlockMasks, fast_forward, flex_available, layer_kv_cache,
                    open_call, reference_forward)
from .plan import EfficiencyPlan
from .withdrawal import DecodeCall, PromptCall, check_decoding, forget, full_after, memory_of

logger = logging.getLogger(__name__)
IMPLEMENTATIONS = ("fast", "reference")
CONFIG_KEY = "eemllm_plan"
_BLOCK_MASKS = NaavitBlockMasks()
"""FlexAttention block masks of the last few layouts, shared by every applied plan (a plan applied
again, as benchmarks do between runs, finds its layout's block mask built)."""


def token_layout(model: PreTrainedModel, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> TokenLayout:
    """The :class:`TokenLayout` of a batch for ``model``, from the model's own image token ids."""
    return TokenLayout.from_input_ids(input_ids, family_of(model).visual_token_ids(model.config), attention_mask)


@dataclass
class _CallState:
    """What the current forward call's layers share (None: no image tokens, run as usual), and its
    token withdrawal (None: the plan keeps every token, or this call has nothing to withdraw)."""

    cache: CallCache | None = None
    withdrawal: PromptCall | DecodeCall | None = None


@dataclass
class AppliedPlan:
    """Handle of a plan applied to a model; :meth:`remove` restores the model exactly."""

    model: PreTrainedModel
    plan: EfficiencyPlan
    implementation: str
    naavit_kernel: str = "gather"
    _layers: list[torch.nn.Module] = field(default_factory=list)
    _hooks: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)
    _state: _CallState = field(default_factory=_CallState)

    def remove(self) -> None:
        """Undo the plan: original layer forwards, no hooks, no plan in the config."""
        self._uninstall()
        if getattr(self.model, "_eemllm_applied", None) is self:
            del self.model._eemllm_applied
            if hasattr(self.model.config, CONFIG_KEY):
                delattr(self.model.config, CONFIG_KEY)

    @contextmanager
    def swapped(self, plan: EfficiencyPlan, implementation: str | None = None) -> Iterator[AppliedPlan]:
        """Run ``plan`` (in ``implementation``, default this handle's) instead of this plan for a
        ``with`` block, then this plan again, on this same handle."""
        if implementation not in (None, *IMPLEMENTATIONS):
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
        before = (self.plan, self.implementation)
        self._uninstall()
        try:
            self._install(plan, self.implementation if implementation is None else implementation)
            yield self
        finally:
            self._uninstall()
            self._install(*before)

    @contextmanager
    def layer_calls(self, layout: TokenLayout) -> Iterator[None]:
        """Let the decoder layers be called one by one (outside a model call) for a batch of ``layout``.

        A model call opens the layers' shared call state from its ``input_ids``; a probe that
        reruns some layers on kept inputs opens it here, so the layers run their plan's modes.
        """
        if not self._layers:
            yield
            return
        if self.plan.withdraws:
            raise NotImplementedError("running the layers one by one under a plan that withdraws visual tokens "
                                      "is not supported yet; measure the plan's modes with visual_keep all 1.0")
        device = layout.visual.device
        self._state.cache = open_call(layout.to(torch.device("cpu")), device, self.naavit_kernel, _BLOCK_MASKS)
        try:
            yield
        finally:
            self._state.cache = None

    def _install(self, plan: EfficiencyPlan, implementation: str) -> None:
        """Give the plan's non-``full`` layers their mode forwards and the model its call hooks."""
        family = family_of(self.model)
        layers = family.decoder_layers(self.model)
        plan.check_layers(len(layers), type(self.model).__name__)
        stages = plan.keep_stages()
        wrapped = [mode != "full" or (bool(stages) and i >= stages[0][0] - 1) for i, mode in enumerate(plan.modes)]
        for layer, wrap in zip(layers, wrapped):
            if wrap:
                recognise_style(layer)  # a layer no style describes is refused before anything changes
        self.plan, self.implementation = plan, implementation
        token_ids = family.visual_token_ids(self.model.config)
        state, kernel = self._state, self.naavit_kernel
        boundaries = full_after(self.model)

        def read_layout(module, args, kwargs):
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if input_ids is None:
                raise ValueError("a model with an eemllm plan needs input_ids (to find the visual tokens); "
                                 "pass input_ids instead of inputs_embeds")
            state.cache, state.withdrawal = None, None
            kv_cache = layer_kv_cache(kwargs)
            if stages and kv_cache is not None and _continues(kv_cache, input_ids, token_ids, plan, implementation):
                state.withdrawal = DecodeCall(memory_of(kv_cache), kv_cache.get_seq_length())
                return
            if input_ids.shape[1] == 1:  # a decoding step: a generated token is never an image feature
                return
            mask = kwargs.get("attention_mask")
            mask = None if mask is None or mask.dim() != 2 else mask[:, -input_ids.shape[1]:]
            cpu = torch.device("cpu")  # one copy of the ids per call; no layer waits on the device after it
            layout = TokenLayout.from_input_ids(input_ids.to(cpu), token_ids, None if mask is None else mask.to(cpu))
            state.cache = open_call(layout, input_ids.device, kernel, _BLOCK_MASKS)
            if state.cache is None:
                logger.info("eemllm: no image tokens in this input; the plan changes nothing for it")
            elif stages:
                state.withdrawal = PromptCall(plan, implementation, state.cache, layers, boundaries, kernel,
                                              _BLOCK_MASKS)

        def end_call(module, args, output):
            if isinstance(state.withdrawal, PromptCall):
                state.withdrawal.finish()
            state.cache, state.withdrawal = None, None

        for layer, mode, wrap in zip(layers, plan.modes, wrapped):
            if not wrap:
                continue
            layer.forward = partial(_mode_forward, layer, layer.forward, mode, state, implementation)
            self._layers.append(layer)
        if self._layers:  # an empty plan changes no layer: no hooks, no per-call work
            self._hooks = [self.model.register_forward_pre_hook(read_layout, with_kwargs=True),
                           self.model.register_forward_hook(end_call, always_call=True)]
        setattr(self.model.config, CONFIG_KEY, plan.to_dict())

    def _uninstall(self) -> None:
        for layer in self._layers:
            del layer.forward
        self._layers.clear()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._state.cache, self._state.withdrawal = None, None

    def __enter__(self) -> AppliedPlan:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def applied_plan(model: PreTrainedModel) -> AppliedPlan | None:
    """The plan currently applied to ``model``, if any."""
    return getattr(model, "_eemllm_applied", None)


def choose_naavit_kernel(model: PreTrainedModel, requested: str = "auto") -> str:
    """The ``naavit`` attention kernel for ``model`` (one of :data:`~eemllm_models.modes.NAAVIT_KERNELS`).

    ``"auto"`` picks ``flex`` (FlexAttention under a block mask) where it is faster: on CUDA, when
    this torch has it; otherwise ``gather``. Compiled ``flex`` also runs on CPU (it needs a C++
    compiler and compiles for tens of seconds), but is not picked there by default.
    """
    if requested == "auto":
        on_cuda = next(model.parameters()).device.type == "cuda"
        return "flex" if on_cuda and flex_available() else "gather"
    if requested not in NAAVIT_KERNELS:
        raise ValueError(f"naavit_kernel must be 'auto' or one of {NAAVIT_KERNELS}, got {requested!r}")
    if requested.startswith("flex") and not flex_available():
        raise ValueError(f"naavit_kernel={requested!r} needs FlexAttention (torch >= 2.5); "
                         f"this is torch {torch.__version__}: use naavit_kernel='gather'")
    return requested


def apply_plan(model: PreTrainedModel, plan: EfficiencyPlan, implementation: str = "fast",
               naavit_kernel: str = "auto") -> AppliedPlan:
    """Run each decoder layer of ``model`` in ``plan``'s mode for visual tokens; returns the undo handle.

    ``implementation`` is ``"fast"`` (does less work; the default) or ``"reference"`` (masks and
    put-back rows; for checking). ``naavit_kernel``: how the fast ``naavit`` layers attend
    (:func:`choose_naavit_kernel`). Logs one line saying which path runs. The plan is recorded in
    ``model.config.eemllm_plan`` while applied.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if applied_plan(model) is not None:
        raise ValueError("a plan is already applied to this model; remove it first (handle.remove())")
    handle = AppliedPlan(model, plan, implementation, choose_naavit_kernel(model, naavit_kernel))
    handle._install(plan, implementation)
    model._eemllm_applied = handle
    logger.info("eemllm: %s", _describe_path(plan, implementation, handle.naavit_kernel))
    return handle


def current_plan(model: PreTrainedModel) -> EfficiencyPlan:
    """The plan ``model`` runs now: its applied plan, or the empty plan (every layer ``full``)."""
    handle = applied_plan(model)
    return EfficiencyPlan.empty(len(family_of(model).decoder_layers(model))) if handle is None else handle.plan


@contextmanager
def running(model: PreTrainedModel, plan: EfficiencyPlan, implementation: str = "fast") -> Iterator[AppliedPlan]:
    """``model`` runs ``plan`` for a ``with`` block, then what it ran before (its applied plan, on the
    same handle, or none): how a probe measures a variant of the model's current plan."""
    handle = applied_plan(model)
    if handle is None:
        with apply_plan(model, plan, implementation) as applied:
            yield applied
    else:
        with handle.swapped(plan, implementation) as applied:
            yield applied


def _continues(kv_cache, input_ids: torch.Tensor, token_ids, plan: EfficiencyPlan, implementation: str) -> bool:
    """Whether this call continues a prompt that ran under ``plan``'s token withdrawal in ``kv_cache``
    (raises when it cannot: another plan, new image tokens, masks the fast path cannot keep right)."""
    if kv_cache.get_seq_length() == 0:
        forget(kv_cache)  # a fresh prompt in this cache
        return False
    memory = memory_of(kv_cache)
    if memory is None:
        return False
    if memory.plan != plan or memory.implementation != implementation:
        raise ValueError("this KV cache was filled under another plan or implementation, which withdrew visual "
                         "tokens from its layers; start from a new cache")
    if bool(torch.isin(input_ids, torch.tensor(list(token_ids), device=input_ids.device)).any()):
        raise NotImplementedError("a call that continues a prompt whose visual tokens were withdrawn brings new "
                                  "image tokens; give every image in the first call")
    check_decoding(memory, kv_cache)
    return True


def _describe_path(plan: EfficiencyPlan, implementation: str, kernel: str) -> str:
    """One line: what the plan changes and which code path runs it."""
    counts = {m: len(plan.layers(m)) for m in ("frozen", "naavit", "composite") if plan.layers(m)}
    if not counts and not plan.withdraws:
        return "empty plan: every layer runs its original forward"
    kept = [f"visual tokens kept from layer {layer}: {keep:g} ({plan.visual_ranking})"
            for layer, keep in plan.keep_stages()]
    changed = "; ".join([", ".join(f"{n} {m}" for m, n in counts.items()) + " layers"] * bool(counts) + kept)
    if implementation == "reference":
        return (f"{changed}, reference implementation (full layers under masks / put-back rows; withdrawn tokens "
                "masked as keys)")
    paths = []
    if "frozen" in counts:
        paths.append("frozen: text rows only, consecutive frozen layers share one copy of the hidden states")
    if "naavit" in counts:
        paths.append({"gather": "naavit: visual queries scored against gathered non-visual keys",
                      "flex": "naavit: compiled FlexAttention with a layout block mask",
                      "flex_eager": "naavit: FlexAttention uncompiled (reference math, slow)"}[kernel])
    if "composite" in counts:
        paths.append("composite: visual rows o_proj(v_proj(x)) + MLP, no visual queries")
    if plan.withdraws:
        paths.append("withdrawal: kept rows gathered once per drop, later layers and their KV caches shorter")
    return f"{changed}, fast implementation; " + "; ".join(paths)


def _mode_forward(layer, original, mode: str, state: _CallState, implementation: str,
                  hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    withdrawal = state.withdrawal
    if withdrawal is not None:
        if args:
            kwargs["attention_mask"] = args[0]
            args = ()
        index = layer.self_attn.layer_idx
        if withdrawal.covers(index):
            return withdrawal.forward(layer, original, mode, hidden_states, kwargs)
        if withdrawal.ranks_before(index):
            withdrawal.rank_full(layer, hidden_states, kwargs)
    cache = state.cache
    if cache is None or mode == "full":
        return original(hidden_states, *args, **kwargs)
    if cache.layout.visual.shape != hidden_states.shape[:2]:
        raise ValueError(
            f"the layer got {tuple(hidden_states.shape[:2])} tokens but the input_ids had "
            f"{tuple(cache.layout.visual.shape)}; call the model with input_ids of the full sequence"
        )
    if args:
        kwargs["attention_mask"] = args[0]
    if implementation == "reference":
        return reference_forward(layer, original, mode, cache.layout, hidden_states, **kwargs)
    return fast_forward(layer, mode, cache.layout, cache.split, hidden_states, call_cache=cache, **kwargs)
