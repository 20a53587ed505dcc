"""Visual tokens that leave the sequence from a layer on: VTW withdrawal and FastV pruning.

A plan's ``visual_keep[l]`` is the fraction of each sequence's visual tokens that layer ``l`` still
sees. Where it drops (a *stage*: :meth:`~eemllm_models.plan.EfficiencyPlan.keep_stages`), each
sequence keeps ``floor(keep * n_visual)`` of its visual tokens (``n_visual`` counted in the prompt,
so fractions are of the original tokens at every stage), chosen among those still present by the
plan's ``visual_ranking``, read at the layer before the stage:

- ``attention`` (FastV): the softmax attention of the last valid (non-padding) position's query over
  the keys that layer uses, averaged over heads; only that one query row is formed (the layer's keys
  are projected once more for it), never a full attention map. Ties go to the earlier token.
- ``stride``: ``floor(keep * n_visual)`` visual tokens evenly spaced in token order.

The others leave the sequence for the stage's first layer and every later one: they form no query,
no key and no value there. A later stage ranks again among the tokens still present.

Two implementations, selected as for the layer modes:

- ``reference``: the full sequence runs through every layer; in the layers of a stage the removed
  tokens are masked out as keys for every query (each still sees itself, so no row is empty). Their
  own rows carry on but are meaningless; text rows are what the two implementations share.
- ``fast``: the kept rows (text, padding and the kept visual tokens, in order) are gathered once where
  a stage starts, with their rotary tables (tokens keep their original positions) and the model's
  mask restricted to them, and later layers run on that shorter sequence; a later stage gathers again
  from it. A layer hands the short tensor on, except the last decoder layer, a layer after which the
  model changes the hidden states itself (Qwen3-VL's deepstack features) and a hooked layer: those
  write their rows back into a full-length copy (removed rows keep their state from before removal).
  The layers' KV caches then hold only the kept positions.

With a KV cache, the removal is remembered for the cache object (:func:`memory_of`), and decoding
steps attend over the shorter caches (fast) or with the removed keys masked (reference). The fast
path needs the cache layers that size the model's own masks (its first full-attention and first
sliding-window layer) before the first stage; otherwise cached decoding is refused with what to do.
Shapes: ``hidden`` ``[batch, seq, hidden]``, layouts and flags ``[batch, seq]``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .anatomy import style_of
from .layout import TokenLayout
from .modes import (CallCache, NaavitBlockMasks, Rotary, Rows, RowSplit, _hooked, allowed_keys, as_model_mask,
                    fast_forward, gather_rows, layer_kv_cache, reference_forward)
from .plan import EfficiencyPlan


def kept_counts(keep: float, n_visual: torch.Tensor) -> torch.Tensor:
    """``[batch]`` visual tokens each sequence keeps: ``floor(keep * n_visual)`` of its ``n_visual`` ``[batch]``."""
    return torch.floor(n_visual.to(torch.float64) * keep + 1e-9).to(torch.long)


def last_valid(valid: torch.Tensor) -> torch.Tensor:
    """``[batch]`` index of the last True of ``valid`` ``[batch, seq]`` (the last prompt position)."""
    return valid.shape[1] - 1 - valid.flip(1).to(torch.int8).argmax(1)


def last_query_attention(layer: torch.nn.Module, hidden: torch.Tensor,
                         position_embeddings: tuple[torch.Tensor, torch.Tensor], allowed: torch.Tensor,
                         query: torch.Tensor) -> torch.Tensor:
    """Attention of the query at position ``query`` ``[batch]`` over every key of ``layer``, averaged over
    heads: ``[batch, seq]`` (float32, each row sums to 1 over ``allowed`` ``[batch, seq]``, the keys that
    query may see). ``hidden`` ``[batch, seq, hidden]``: the layer's input; ``position_embeddings``: its
    ``cos``/``sin`` ``[batch|1, seq, head_dim]``. Forms one query row per sequence, not an attention map."""
    attn, style = layer.self_attn, style_of(layer)
    batch = hidden.shape[0]
    cos, sin = (t.expand(batch, -1, -1) for t in position_embeddings)
    normed = layer.input_layernorm(hidden)
    at = query[:, None]
    q = Rotary.of(gather_rows(cos, at), gather_rows(sin, at)).apply(style.queries(attn, gather_rows(normed, at)))
    k = Rotary.of(cos, sin).apply(style.keys(attn, normed)).repeat_interleave(attn.num_key_value_groups, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhk", q, k).float() * attn.scaling  # [batch, heads, seq]
    scores = scores.masked_fill(~allowed[:, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1).mean(1)


def mask_row(attention_mask: torch.Tensor | None, query: torch.Tensor, seq: int) -> torch.Tensor:
    """``[batch, seq]`` bool: the keys the query at position ``query`` ``[batch]`` may see under the model's
    mask (``None``: causal; bool or additive ``[batch|1, 1, seq, seq]``), read for that one row only."""
    if attention_mask is None:
        return torch.arange(seq, device=query.device)[None, :] <= query[:, None]
    mask = attention_mask[:, 0, -seq:, :seq].expand(query.shape[0], -1, -1)
    row = mask[torch.arange(query.shape[0], device=query.device), query]
    return row if row.dtype == torch.bool else row == 0


def select_visual(ranking: str, candidates: torch.Tensor, counts: torch.Tensor,
                  scores: torch.Tensor | None = None) -> torch.Tensor:
    """``[batch, seq]`` bool: the ``counts[b]`` candidates (``candidates`` ``[batch, seq]``) each sequence keeps.

    ``attention``: the highest ``scores`` ``[batch, seq]`` (ties to the earlier position); ``stride``:
    evenly spaced in position order (candidate ``j`` of ``m`` is kept when ``floor((j + 1) c / m)``
    exceeds ``floor(j c / m)``)."""
    counts = counts.to(candidates.device)
    if ranking == "stride":
        order = candidates.cumsum(1) - 1  # candidate number in position order
        total = candidates.sum(1, keepdim=True).clamp(min=1)
        step = ((order + 1) * counts[:, None]).div(total, rounding_mode="floor") \
            - (order * counts[:, None]).div(total, rounding_mode="floor")
        return candidates & (step > 0)
    if ranking != "attention" or scores is None:
        raise ValueError(f"ranking must be 'attention' (with scores) or 'stride', got {ranking!r}")
    ranked = scores.masked_fill(~candidates, float("-inf"))
    order = torch.argsort(ranked, dim=1, descending=True, stable=True)
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)  # rank[b, i]: place of token i in the order
    return candidates & (rank < counts[:, None])


@dataclass
class Stage:
    """One stage of a call: from ``first_layer`` on, the tokens in ``removed`` ``[batch, seq]`` are gone.

    Fast path: ``kept`` (:class:`~eemllm_models.modes.Rows` over the original positions: text, padding
    and kept visual tokens, in order), ``local`` (the same rows in the previous stage's short sequence;
    None for the first stage), ``call`` (the :class:`~eemllm_models.modes.CallCache` of the short
    sequence, for the layer modes and the derived masks and rotary tables), ``visual_left`` (whether
    any visual token remains: without one, every layer of the stage runs its original forward)."""

    first_layer: int
    removed: torch.Tensor
    kept: Rows | None = None
    local: Rows | None = None
    call: CallCache | None = None
    visual_left: bool = True


@dataclass
class Memory:
    """What a KV cache filled under a withdrawal plan needs for its decoding steps: the plan and
    implementation, the prompt length and layout, and the stages."""

    plan: EfficiencyPlan
    implementation: str
    prompt_length: int
    layout: TokenLayout
    stages: list[Stage]


_MEMORIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def memory_of(kv_cache) -> Memory | None:
    """The :class:`Memory` of a KV cache whose prompt ran under a withdrawal plan, if any."""
    try:
        return _MEMORIES.get(kv_cache)
    except TypeError:  # not weak-referenceable: never registered
        return None


def forget(kv_cache) -> None:
    """Drop what :func:`memory_of` knows of ``kv_cache`` (a fresh prompt is starting in it)."""
    if kv_cache is not None and memory_of(kv_cache) is not None:
        del _MEMORIES[kv_cache]


def _with_layer_mask(kwargs: dict, mask) -> dict:
    return {**kwargs, "attention_mask": mask}


def _gather_positions(position_ids: torch.Tensor | None, index: torch.Tensor, seq: int) -> torch.Tensor | None:
    """``position_ids`` ``[..., batch|1, seq]`` at the positions ``index`` ``[batch, n]`` (others as they are)."""
    if position_ids is None or position_ids.shape[-1] != seq:
        return position_ids
    lead = position_ids.shape[:-2]
    full = position_ids.expand(*lead, index.shape[0], seq)
    return full.gather(-1, index.expand(*lead, *index.shape))


def short_layer_kwargs(kwargs: dict, kept: Rows, seq: int, dtype: torch.dtype,
                       derived: Callable[[object, tuple, Callable], object] | None = None) -> dict:
    """A decoder layer's keyword arguments ``kwargs`` for a full sequence of ``seq`` tokens, restricted to the
    ``kept`` rows (:class:`~eemllm_models.modes.Rows`, ``[batch, n]``): the model's mask ``[batch|1, 1, n, n]``
    (a kept row that may see no kept key sees itself), the rotary ``cos``/``sin`` ``[batch, n, head_dim]``
    (tokens keep their original positions) and ``position_ids`` at those rows. ``derived``: a
    :meth:`~eemllm_models.modes.CallCache.derived` that computes each once per call (default: computed here)."""
    derived = derived or (lambda name, sources, compute: compute())
    mask = kwargs.get("attention_mask")
    pe = kwargs.get("position_embeddings")
    short = dict(kwargs)

    def short_mask() -> torch.Tensor:
        allowed = allowed_keys(mask, kept.index.shape[0], seq, seq, kept.index.device)
        n = kept.n
        rows = allowed.gather(2, kept.index[:, None, :, None].expand(-1, 1, -1, seq))
        cols = rows.gather(3, kept.index[:, None, None, :].expand(-1, 1, n, -1)) & kept.ok[:, None, None, :]
        alone = ~cols.any(-1, keepdim=True) & torch.eye(n, dtype=torch.bool, device=cols.device)
        return as_model_mask(cols | alone, mask, dtype)

    if mask is not None and mask.shape[-1] != seq:
        raise NotImplementedError(f"withdrawing visual tokens needs the prompt in one call from an empty KV "
                                  f"cache (the mask has {mask.shape[-1]} keys for {seq} tokens)")
    short["attention_mask"] = derived(("short_mask", dtype), (mask,), short_mask)
    if pe is not None:
        if pe[0].dim() != 3:
            raise NotImplementedError("withdrawing visual tokens needs the rotary tables as (cos, sin), each "
                                      "[batch, seq, head_dim]; this model passes another form")
        short["position_embeddings"] = derived("short_rotary", tuple(pe), lambda: tuple(
            kept.take(t.expand(kept.index.shape[0], -1, -1)) for t in pe))
    if "position_ids" in kwargs:
        short["position_ids"] = derived("short_positions", (kwargs["position_ids"],), lambda: (
            _gather_positions(kwargs["position_ids"], kept.index, seq)))
    return short


@dataclass
class PromptCall:
    """The withdrawal state of one forward call over a prompt with image tokens (see the module notes).

    ``call``: the call's :class:`~eemllm_models.modes.CallCache` (full sequence, its layout on the
    call's device); ``layers``: the decoder layers; ``full_after``: layers after which the model
    changes the hidden states itself (their output must be full length)."""

    plan: EfficiencyPlan
    implementation: str
    call: CallCache
    layers: Sequence[torch.nn.Module]
    full_after: frozenset[int]
    naavit_kernel: str = "gather"
    block_masks: NaavitBlockMasks | None = None
    stages: list[Stage] = field(default_factory=list)
    _starts: dict[int, float] = field(default_factory=dict)
    _carried: tuple[torch.Tensor, int] | None = None
    _base: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self._starts = dict(self.plan.keep_stages())
        self.first_layer = min(self._starts)

    @property
    def layout(self) -> TokenLayout:
        return self.call.layout

    def covers(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` runs with some tokens removed."""
        return layer_idx >= self.first_layer

    def finish(self) -> None:
        """End the call: drop the short masks and rotary tables and the carried tensors (a KV cache's
        :class:`Memory` keeps only the stages' positions)."""
        for stage in self.stages:
            if stage.call is not None:
                stage.call.clear()
        self._carried = self._base = None

    def ranks_before(self, layer_idx: int) -> bool:
        """Whether the tokens are ranked at layer ``layer_idx`` (a stage starts after it)."""
        return layer_idx + 1 in self._starts

    # ---- ranking -------------------------------------------------------------------------------
    def rank_full(self, layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict) -> None:
        """Rank at a layer that sees the whole sequence (before the first stage, or any layer of the
        reference) and open the next stage; ``kwargs``: the layer's keyword arguments."""
        layout = self.layout
        removed = self.stages[-1].removed if self.stages else torch.zeros_like(layout.visual)
        candidates = layout.visual & ~removed
        selected = self._select(layer, hidden, kwargs, layout.valid, candidates, removed)
        removed = removed | (candidates & ~selected)
        stage = Stage(layer.self_attn.layer_idx + 1, removed)
        if self.implementation == "fast":
            stage.kept = Rows.where(~removed)
            stage.call = self._stage_call(stage.kept)
            stage.visual_left = bool(stage.call.layout.visual.any())
        self.stages.append(stage)

    def _rank_short(self, layer: torch.nn.Module, x: torch.Tensor, kwargs: dict) -> None:
        """Rank at a layer of the fast path's short sequence ``x`` and open the next stage."""
        previous = self.stages[-1]
        short = previous.call.layout
        selected = self._select(layer, x, kwargs, short.valid, short.visual)
        keep_local = previous.kept.ok & ~(short.visual & ~selected)
        gone = ~keep_local.flatten()
        if previous.kept.slots_ok is not None:
            gone = gone[previous.kept.slots_ok]
        removed = previous.removed.clone()
        removed.view(-1)[previous.kept.flat_ok] = gone
        kept = Rows.where(~removed)
        call = self._stage_call(kept)
        stage = Stage(layer.self_attn.layer_idx + 1, removed, kept, Rows.where(keep_local), call,
                      bool(call.layout.visual.any()))
        self.stages.append(stage)

    def _select(self, layer, hidden: torch.Tensor, kwargs: dict, valid: torch.Tensor, candidates: torch.Tensor,
                removed: torch.Tensor | None = None) -> torch.Tensor:
        """``[batch, seq]``: the ``candidates`` to keep for the next stage, ranked at ``layer`` (its input
        ``hidden`` and keyword arguments ``kwargs``); the last query sees no ``removed`` key."""
        keep = self._starts[layer.self_attn.layer_idx + 1]
        counts = kept_counts(keep, self.layout.n_visual)
        ranking = self.plan.visual_ranking
        if ranking == "stride" or keep == 0.0:
            return select_visual("stride", candidates, counts)
        query = last_valid(valid)
        row = mask_row(kwargs.get("attention_mask"), query, hidden.shape[1])
        if removed is not None:
            row = row & ~removed | (torch.arange(hidden.shape[1], device=row.device) == query[:, None])
        scores = last_query_attention(layer, hidden, kwargs["position_embeddings"], row, query)
        return select_visual(ranking, candidates, counts, scores)

    def _allowed(self, attention_mask, seq: int, removed: torch.Tensor) -> torch.Tensor:
        """``[batch, seq, seq]`` bool: the model's mask with the ``removed`` keys blocked (each row keeps itself)."""
        allowed = allowed_keys(attention_mask, removed.shape[0], seq, seq, removed.device)[:, 0]
        return allowed & ~(removed[:, None, :] & ~torch.eye(seq, dtype=torch.bool, device=removed.device))

    def _stage_call(self, kept: Rows) -> CallCache:
        """The :class:`~eemllm_models.modes.CallCache` of the short sequence of ``kept`` (its layout: the
        kept rows' visual and valid flags, filler slots neither)."""
        layout = self.layout
        visual = kept.take(layout.visual[..., None])[..., 0] & kept.ok
        valid = kept.take(layout.valid[..., None])[..., 0] & kept.ok
        short = TokenLayout(visual, valid)
        return CallCache(short, RowSplit.from_layout(short), self.naavit_kernel, self.block_masks)

    # ---- layers with tokens removed ---------------------------------------------------------------
    def forward(self, layer: torch.nn.Module, original: Callable, mode: str, hidden: torch.Tensor,
                kwargs: dict) -> torch.Tensor:
        """Layer ``layer`` (at or after the first stage) in ``mode`` with the stage's tokens removed."""
        self._register(kwargs)
        if self.implementation == "reference":
            return self._reference(layer, original, mode, hidden, kwargs)
        return self._fast(layer, original, mode, hidden, kwargs)

    def _register(self, kwargs: dict) -> None:
        kv_cache = layer_kv_cache(kwargs)
        if kv_cache is not None and memory_of(kv_cache) is None:
            _MEMORIES[kv_cache] = Memory(self.plan, self.implementation, self.layout.visual.shape[1], self.layout,
                                         self.stages)

    def _reference(self, layer, original, mode, hidden, kwargs) -> torch.Tensor:
        """The full sequence through the layer, the stage's removed tokens masked as keys for every query."""
        stage = self.stages[-1]
        masked = self._reference_kwargs(kwargs, stage, hidden.shape[1], hidden.dtype)
        if self.ranks_before(layer.self_attn.layer_idx):
            self.rank_full(layer, hidden, masked)
        if mode == "full":
            return original(hidden, **masked)
        return reference_forward(layer, original, mode, self.call.layout, hidden, **masked)

    def _reference_kwargs(self, kwargs: dict, stage: Stage, seq: int, dtype: torch.dtype) -> dict:
        mask = kwargs.get("attention_mask")
        blocked = self.call.derived(("withdrawn_mask", id(stage), dtype), (mask,), lambda: as_model_mask(
            self._allowed(mask, seq, stage.removed)[:, None], mask, dtype))
        return _with_layer_mask(kwargs, blocked)

    def _fast(self, layer, original, mode, hidden, kwargs) -> torch.Tensor:
        """The stage's short sequence through the layer; short out, or full length where it must be."""
        index = layer.self_attn.layer_idx
        number = max(i for i, s in enumerate(self.stages) if s.first_layer <= index)
        stage = self.stages[number]
        x = self._enter(stage, number, hidden)
        short = self._short_kwargs(stage, kwargs, hidden.dtype)
        if self.ranks_before(index):
            self._rank_short(layer, x, short)
        if mode == "full" or not stage.visual_left:  # a mode has nothing to change without visual tokens
            out = original(x, **short)
        else:
            call = stage.call
            out = fast_forward(layer, mode, call.layout, call.split, x, call_cache=call, **short)
        if not self._returns_full(index):
            self._carried = (out, number)
            return out
        self._carried = None
        full = self._base.clone(memory_format=torch.contiguous_format)
        stage.kept.put_(full, out)
        return full

    def _enter(self, stage: Stage, number: int, hidden: torch.Tensor) -> torch.Tensor:
        """The stage's short sequence ``[batch, n_kept, hidden]`` from what the layer received."""
        carried = self._carried
        if carried is not None and hidden is carried[0]:
            return hidden if carried[1] == number else stage.local.take(hidden)
        if hidden.shape[:2] != self.layout.visual.shape:
            raise ValueError(f"a layer after visual tokens were withdrawn got {tuple(hidden.shape[:2])} tokens, "
                             f"neither the full sequence {tuple(self.layout.visual.shape)} nor the short one the "
                             "layer before returned; call the decoder layers through the model")
        self._base = hidden
        return stage.kept.take(hidden)

    def _short_kwargs(self, stage: Stage, kwargs: dict, dtype: torch.dtype) -> dict:
        """The layer's keyword arguments for the stage's short sequence: its mask, rotary tables and positions."""
        return short_layer_kwargs(kwargs, stage.kept, self.layout.visual.shape[1], dtype, stage.call.derived)

    def _returns_full(self, index: int) -> bool:
        last = index == len(self.layers) - 1
        return last or index in self.full_after or _hooked(self.layers[index]) or _hooked(self.layers[index + 1])


@dataclass
class DecodeCall:
    """A decoding step over a KV cache whose prompt ran under a withdrawal plan: the layers at or after
    the first stage attend with the removed positions gone (fast: shorter caches) or masked (reference).
    ``past``: tokens in the cache before this step (layer 0 keeps them all)."""

    memory: Memory
    past: int

    def __post_init__(self) -> None:
        self.first_layer = self.memory.stages[0].first_layer

    def covers(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_layer

    def ranks_before(self, layer_idx: int) -> bool:
        return False

    def forward(self, layer: torch.nn.Module, original: Callable, mode: str, hidden: torch.Tensor,
                kwargs: dict) -> torch.Tensor:
        """Layer ``layer`` on the step's new tokens ``[batch, q, hidden]`` (generated tokens: text, run in full)."""
        attn, memory = layer.self_attn, self.memory
        index, steps = attn.layer_idx, hidden.shape[1]
        stage = [s for s in memory.stages if s.first_layer <= index][-1]
        kv_cache = layer_kv_cache(kwargs)
        keys = kv_cache.get_mask_sizes(steps, index)[0]
        batch, device = hidden.shape[0], hidden.device
        prompt, total = memory.prompt_length, self.past + steps
        new = torch.arange(prompt, total, device=device).expand(batch, -1)
        if memory.implementation == "fast":
            valid = memory.layout.valid.gather(1, stage.kept.index) & stage.kept.ok
            positions = torch.cat([stage.kept.index, new], dim=1)[:, -keys:]
            present = torch.cat([valid, torch.ones_like(new, dtype=torch.bool)], dim=1)[:, -keys:]
        else:
            positions = torch.arange(total - keys, total, device=device).expand(batch, -1)
            removed = stage.removed.gather(1, positions.clamp(max=prompt - 1)) & (positions < prompt)
            present = ~removed & torch.cat([memory.layout.valid, torch.ones_like(new, dtype=torch.bool)],
                                           dim=1)[:, -keys:]
        query = torch.arange(self.past, total, device=device)[None, :, None]
        allowed = present[:, None, :] & (positions[:, None, :] <= query)
        window = getattr(attn, "sliding_window", None)
        if window is not None:
            allowed &= positions[:, None, :] > query - window
        mask = kwargs.get("attention_mask")
        return original(hidden, **_with_layer_mask(kwargs, as_model_mask(allowed[:, None], mask, hidden.dtype)))


def check_decoding(memory: Memory, kv_cache) -> None:
    """Raise unless the model's own masks stay right for a decoding step over ``kv_cache`` (fast path):
    the cache layers the model sizes its masks from must all precede the first stage."""
    if memory.implementation != "fast":
        return
    sliding = list(getattr(kv_cache, "is_sliding", []))
    sizing = [i for i in (sliding.index(False) if False in sliding else None,
                          sliding.index(True) if True in sliding else None) if i is not None]
    first = memory.stages[0].first_layer
    late = [i for i in sizing if i >= first]
    if late:
        raise ValueError(
            f"cached decoding after withdrawing visual tokens from layer {first} needs the KV-cache layers the "
            f"model sizes its masks from (layer {late[0]}) before it, and that layer's cache holds only the kept "
            f"tokens; withdraw from layer {max(late) + 1} or later, apply the plan with implementation='reference', "
            "or generate with use_cache=False")


def full_after(model) -> frozenset[int]:
    """Layers after which ``model`` changes the hidden states outside the layers: Qwen3-VL adds its
    deepstack visual features after its first ``len(deepstack_visual_indexes)`` layers."""
    vision = getattr(model.config, "vision_config", None)
    return frozenset(range(len(getattr(vision, "deepstack_visual_indexes", None) or ())))
