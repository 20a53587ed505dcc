"""Decoder-layer forwards that run one mode for visual tokens: fast paths and their references.

Every function here takes the decoder layer (any style of :mod:`eemllm_models.anatomy`: its
queries, keys and values, its attention residual and its feed-forward block are the style's steps;
``input_layernorm`` is what every style has) and the arguments the model passes to it, plus the
batch's :class:`~eemllm_models.layout.TokenLayout`. Shapes: ``hidden_states`` ``[batch, seq, hidden]``; ``attention_mask`` is whatever the model built for
its attention implementation: ``None`` (plain causal), a bool ``[batch|1, 1, seq, keys]``
(``sdpa``: True = attend) or an additive float mask of that shape (``eager``).

The references are the obvious versions: ``frozen`` runs the full layer and puts the visual
rows back (what the ShortV HF port does, no savings); ``naavit`` and ``composite`` run the full
layer under a 4D mask (visual queries see no other visual key / only themselves). The fast paths
do less work: queries, o_proj and MLP only for the rows that need them, and visual queries of
``naavit`` scored only against non-visual keys (``gather`` kernel) or with FlexAttention under a
block mask that skips the visual x visual blocks (``flex`` kernel).

The layers of one forward call share a :class:`CallCache`: the row split, the rotary tables and
masks of the text and visual rows (built once per call), and the frozen run in progress.
Consecutive ``frozen`` layers form a run: the run's first layer copies the hidden states once,
and every layer of the run writes its text rows into that copy in place and hands it on, so the
visual rows (unchanged inside the run) are never copied again and the next layer reuses the text
rows without gathering them. A layer continues a run only when the tensor it receives is the one
the previous layer of the run returned, unmodified (same object, same version counter), and when
no one can see the tensor being reused: no hooks on either layer (forward hooks, pre-hooks,
``output_hidden_states`` capture, global module hooks) and no autograd. Otherwise it starts a new
run, which costs one copy of the hidden states, as a lone frozen layer does.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import repeat_kv, rotate_half

from .anatomy import style_of
from .layout import TokenLayout

SUPPORTED_ATTENTION = ("sdpa", "eager")
NAAVIT_KERNELS = ("gather", "flex", "flex_eager")
"""How ``naavit`` layers compute the attention of visual queries (fast implementation):

- ``gather``: visual queries scored against the non-visual keys only (gathered) and themselves;
  plain matrix products, any device.
- ``flex``: every query through compiled FlexAttention under a block mask built from the token
  layout, which skips the visual x visual blocks (the fast choice on CUDA).
- ``flex_eager``: the same masks through FlexAttention without ``torch.compile`` (torch's dense
  reference math: slow; it checks the flex path where compiling is too slow).
"""


def _flat_positions(index: torch.Tensor, seq: int) -> torch.Tensor:
    """Positions ``index`` ``[batch, n]`` as rows of the flattened ``[batch * seq]`` -> ``[batch * n]``."""
    return (index + torch.arange(index.shape[0], device=index.device)[:, None] * seq).flatten()


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` (on the CPU) on ``device``: through pinned memory and without waiting on CUDA."""
    if x.device == device:
        return x
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def take_rows(x: torch.Tensor, flat: torch.Tensor, n: int) -> torch.Tensor:
    """Rows ``flat`` ``[batch * n]`` of ``x`` ``[batch, seq, ...]`` (seen as ``[batch * seq, ...]``)
    -> ``[batch, n, ...]``."""
    return x.reshape(-1, *x.shape[2:]).index_select(0, flat).view(x.shape[0], n, *x.shape[2:])


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` ``[batch, seq, ...]`` at positions ``index`` ``[batch, n]`` -> ``[batch, n, ...]``."""
    return take_rows(x, _flat_positions(index, x.shape[1]), index.shape[1])


@dataclass(frozen=True)
class Rows:
    """The positions of one kind of token in a batch, padded to the longest sequence.

    ``index`` ``[batch, n]``: positions, in order; slots past a sequence's count (``ok`` False)
    point at some position of another kind and are ignored. ``flat`` ``[batch * n]``: the same as
    rows of ``[batch * seq]``; ``flat_ok`` ``[n_ok]``: those of the valid slots only, and
    ``slots_ok`` ``[n_ok]`` their slot numbers in ``[batch * n]`` (None when every slot is valid).
    """

    index: torch.Tensor
    ok: torch.Tensor
    flat: torch.Tensor
    flat_ok: torch.Tensor
    slots_ok: torch.Tensor | None

    @classmethod
    def where(cls, flags: torch.Tensor) -> Rows:
        """The positions where ``flags`` ``[batch, seq]`` (bool) is True."""
        counts = flags.sum(-1)
        n = int(counts.max())
        index = torch.argsort((~flags).to(torch.int8), dim=1, stable=True)[:, :n]
        ok = torch.arange(n, device=flags.device) < counts[:, None]
        flat = _flat_positions(index, flags.shape[1])
        if bool(ok.all()):
            return cls(index, ok, flat, flat, None)
        slots = ok.flatten().nonzero().squeeze(1)
        return cls(index, ok, flat, flat[slots], slots)

    @property
    def n(self) -> int:
        return self.index.shape[1]

    def to(self, device: torch.device) -> Rows:
        """These rows on ``device`` (an asynchronous copy from pinned memory on CUDA)."""
        return Rows(*(None if t is None else to_device(t, device) for t in
                      (self.index, self.ok, self.flat, self.flat_ok, self.slots_ok)))

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[batch, seq, ...]`` at these positions -> ``[batch, n, ...]``."""
        return take_rows(x, self.flat, self.n)

    def take_ok(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[batch, seq, ...]`` at the valid slots' positions only, as one sequence -> ``[1, n_ok, ...]``:
        row-wise work (o_proj, MLP) on these rows skips the slots that only pad the batch to the longest count."""
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.flat_ok)[None]

    def ok_slots(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` ``[batch, n, ...]`` (one per slot, e.g. :meth:`take`'s) at the valid slots -> ``[1, n_ok, ...]``."""
        rows = rows.reshape(-1, *rows.shape[2:])
        return (rows if self.slots_ok is None else rows.index_select(0, self.slots_ok))[None]

    def put_ok_(self, out: torch.Tensor, rows: torch.Tensor) -> None:
        """``out`` at the valid slots' positions ``= rows`` ``[1, n_ok, width]``, in place; ``out`` ``[batch, seq,
        width]`` contiguous."""
        out.view(-1, out.shape[-1]).index_copy_(0, self.flat_ok, rows[0].to(out.dtype))

    def put_(self, out: torch.Tensor, rows: torch.Tensor) -> None:
        """``out[b, index[b, i]] = rows[b, i]`` for the valid slots, in place; ``out`` ``[batch, seq, width]``
        contiguous, ``rows`` ``[batch, n, width]``."""
        self.put_ok_(out, self.ok_slots(rows))


@dataclass(frozen=True)
class RowSplit:
    """A layout's positions split into visual rows and other rows (the text: everything a visual mode
    leaves in full), each as :class:`Rows`. Padding is in neither: no mode forms a query for it,
    ``frozen`` passes it on unchanged (o_proj and MLP run on the valid text rows only, not on the slots
    that pad them to the longest text), ``naavit`` and ``composite`` give it a zero attention output; its
    keys are masked anyway, so what a padding row holds never reaches a real one."""

    visual_rows: Rows
    other_rows: Rows

    @classmethod
    def from_layout(cls, layout: TokenLayout) -> RowSplit:
        """The split of ``layout``, on its device. Built from a CPU layout, no step waits for a device:
        :func:`open_call` does that, then moves the split with :meth:`to`."""
        return cls(Rows.where(layout.visual), Rows.where(layout.text))

    def to(self, device: torch.device) -> RowSplit:
        return RowSplit(self.visual_rows.to(device), self.other_rows.to(device))

    @property
    def visual(self) -> torch.Tensor:
        """``[batch, n_visual]`` visual positions."""
        return self.visual_rows.index

    @property
    def visual_ok(self) -> torch.Tensor:
        return self.visual_rows.ok

    @property
    def other(self) -> torch.Tensor:
        """``[batch, n_other]`` positions of the text."""
        return self.other_rows.index

    @property
    def other_ok(self) -> torch.Tensor:
        return self.other_rows.ok


def allowed_keys(attention_mask: torch.Tensor | None, batch: int, seq: int, keys: int,
                 device: torch.device) -> torch.Tensor:
    """The model's mask as bool ``[batch, 1, seq, keys]`` (True = may attend)."""
    if attention_mask is None:
        past = keys - seq
        query_pos = torch.arange(seq, device=device)[:, None] + past
        return (torch.arange(keys, device=device)[None, :] <= query_pos).expand(batch, 1, seq, keys)
    if attention_mask.dim() != 4:
        raise ValueError(
            f"eemllm's layer modes need a 4D attention mask, got {attention_mask.dim()}D; load the model with "
            f"attn_implementation in {SUPPORTED_ATTENTION}"
        )
    mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    return mask[..., -seq:, :keys].expand(batch, 1, seq, keys)


def as_model_mask(allowed: torch.Tensor, like: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Turn a bool mask back into the format of the model's own mask ``like`` (bool or additive)."""
    if like is None or like.dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


def mode_mask(mode: str, layout: TokenLayout, allowed: torch.Tensor) -> torch.Tensor:
    """``allowed`` ``[batch, 1, seq, keys]`` restricted for ``mode``'s visual queries (keys of this chunk).

    ``naavit``: a visual query keeps no other visual key of this chunk; ``composite``: a visual
    query keeps only itself. Text queries are untouched.
    """
    batch, _, seq, keys = allowed.shape
    visual_q = layout.visual[:, None, :, None]
    chunk_visual_k = torch.zeros(batch, keys, dtype=torch.bool, device=allowed.device)
    chunk_visual_k[:, keys - seq:] = layout.visual
    position = torch.arange(seq, device=allowed.device)
    is_self = (position[:, None] + keys - seq) == torch.arange(keys, device=allowed.device)[None, :]
    if mode == "naavit":
        blocked = visual_q & chunk_visual_k[:, None, None, :] & ~is_self
    elif mode == "composite":
        blocked = visual_q & ~is_self
    else:
        raise ValueError(f"mode {mode!r} has no mask form; masks exist for 'naavit' and 'composite'")
    return allowed & ~blocked


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` ``[batch, heads, n, head_dim]`` at ``cos``/``sin`` ``[batch, n, head_dim]``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (rotate_half(x) * sin)


@dataclass(frozen=True)
class Rotary:
    """Rotary tables of some rows: ``cos`` and ``sin_signed`` ``[batch|1, n, 1, head_dim]``, where
    ``sin_signed`` is ``sin`` with its first half negated (``rotate_half`` folded into the table)."""

    cos: torch.Tensor
    sin_signed: torch.Tensor

    @classmethod
    def of(cls, cos: torch.Tensor, sin: torch.Tensor) -> Rotary:
        """From the model's ``cos``/``sin`` ``[batch|1, n, head_dim]``."""
        half = sin.shape[-1] // 2
        return cls(cos.unsqueeze(2), torch.cat([-sin[..., :half], sin[..., half:]], dim=-1).unsqueeze(2))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x * cos + rotate_half(x) * sin`` for ``x`` ``[batch, n, heads, head_dim]``, rounded as HF's
        ``apply_rotary_pos_emb`` rounds it (products, then sums: no fused multiply-add)."""
        half = x.shape[-1] // 2
        out = x * self.cos
        out[..., :half] += x[..., half:] * self.sin_signed[..., :half]
        out[..., half:] += x[..., :half] * self.sin_signed[..., half:]
        return out


@dataclass(frozen=True)
class _RotaryTables:
    all: Rotary
    other: Rotary
    visual: Rotary


@dataclass
class _FrozenRun:
    """A frozen run in progress: ``buffer`` ``[batch, seq, hidden]`` is the last layer's output (its
    own copy: visual rows from the run's input, text rows written in place); ``text`` the text rows
    ``[1, n_text, hidden]`` (:meth:`Rows.take_ok`)."""

    buffer: torch.Tensor
    version: int | None
    text: torch.Tensor
    next_layer: int

    def continues(self, layer: torch.nn.Module, hidden_states: torch.Tensor) -> bool:
        return (hidden_states is self.buffer and _version(hidden_states) == self.version
                and layer.self_attn.layer_idx == self.next_layer and not _hooked(layer))


def _version(x: torch.Tensor) -> int | None:
    """``x``'s version counter (bumped by in-place changes); None for inference-mode tensors, which have none."""
    return None if x.is_inference() else x._version


class NaavitBlockMasks:
    """FlexAttention block masks for ``naavit``, built from the token layout and the model's mask and
    kept for the last ``size`` layouts (a repeated layout reuses its block mask across calls)."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._masks: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, Any]] = OrderedDict()

    def get(self, layout: TokenLayout, allowed: torch.Tensor):
        """The ``BlockMask`` for ``allowed`` ``[batch, 1, seq, keys]`` (bool) with no visual query scoring
        another visual key of this chunk."""
        from torch.nn.attention.flex_attention import create_block_mask

        batch, _, seq, keys = allowed.shape
        key = (batch, seq, keys, allowed.device)
        hit = self._masks.get(key)
        if hit is not None and torch.equal(hit[0], allowed[:, 0]) and torch.equal(hit[1], layout.visual):
            self._masks.move_to_end(key)
            return hit[2]
        past = keys - seq
        dense = allowed[:, 0].clone()  # [batch, seq, keys]
        visual_q = layout.visual.clone()
        visual_k = torch.zeros(batch, keys, dtype=torch.bool, device=allowed.device)
        visual_k[:, past:] = visual_q

        def naavit_mask(b, h, q_idx, kv_idx):
            return dense[b, q_idx, kv_idx] & ~(visual_q[b, q_idx] & visual_k[b, kv_idx] & (q_idx + past != kv_idx))

        block_mask = create_block_mask(naavit_mask, batch, None, seq, keys, device=allowed.device)
        self._masks[key] = (dense, visual_q, block_mask)
        while len(self._masks) > self.size:
            self._masks.popitem(last=False)
        return block_mask


_COMPILED_FLEX: Callable | None = None


def _eager_flex_attention(*args, **kwargs) -> torch.Tensor:
    """FlexAttention without compiling, chosen on purpose: torch's warning about it is not news."""
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(*args, **kwargs)


def _flex_attention(eager: bool) -> Callable:
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if eager:
        return _eager_flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention)
    return _COMPILED_FLEX


def flex_available() -> bool:
    """True when this torch has FlexAttention (``torch.nn.attention.flex_attention``)."""
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


class CallCache:
    """What the decoder layers of one forward call share: the ``layout``, its :class:`RowSplit`,
    tensors derived from the model's mask and rotary tables (built by the first layer that needs
    them, reused while the layers receive the same tensors), and the frozen run in progress.

    ``naavit_kernel``: one of :data:`NAAVIT_KERNELS`; ``block_masks``: where the ``flex`` kernels
    keep block masks across calls (a fresh store when None).
    """

    def __init__(self, layout: TokenLayout, split: RowSplit | None = None, naavit_kernel: str = "gather",
                 block_masks: NaavitBlockMasks | None = None) -> None:
        if naavit_kernel not in NAAVIT_KERNELS:
            raise ValueError(f"naavit_kernel must be one of {NAAVIT_KERNELS}, got {naavit_kernel!r}")
        self.layout = layout
        self.split = RowSplit.from_layout(layout) if split is None else split
        self.naavit_kernel = naavit_kernel
        self.block_masks = NaavitBlockMasks() if block_masks is None else block_masks
        self.run: _FrozenRun | None = None
        self._derived: dict[Any, tuple[tuple, Any]] = {}

    def derived(self, name: Any, sources: tuple, compute: Callable[[], Any]) -> Any:
        """``compute()``, computed once per ``name`` and ``sources`` (the same objects): layers that get
        different masks or rotary tables (Gemma 3's sliding-window and global layers) each keep theirs."""
        key = (name, tuple(id(source) for source in sources))
        hit = self._derived.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[0], sources)):
            return hit[1]
        value = compute()
        self._derived[key] = (sources, value)
        return value

    def rotary(self, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> _RotaryTables:
        def tables() -> _RotaryTables:
            cos, sin = position_embeddings
            batch = self.layout.visual.shape[0]
            rows = [t.expand(batch, -1, -1) for t in (cos, sin)]
            split = self.split
            return _RotaryTables(Rotary.of(cos, sin), Rotary.of(*(split.other_rows.take(t) for t in rows)),
                                 Rotary.of(*(split.visual_rows.take(t) for t in rows)))

        return self.derived("rotary", tuple(position_embeddings), tables)

    def allowed(self, attention_mask: torch.Tensor | None, seq: int, keys: int) -> torch.Tensor:
        """The model's mask as bool ``[batch, 1, seq, keys]``."""
        batch = self.layout.visual.shape[0]
        return self.derived(("allowed", keys), (attention_mask,), lambda: allowed_keys(
            attention_mask, batch, seq, keys, self.layout.visual.device))

    def other_mask(self, attention_mask: torch.Tensor | None, seq: int, keys: int, dtype: torch.dtype):
        """The mask of the non-visual queries ``[batch, 1, n_other, keys]`` in the model's format."""
        def compute() -> torch.Tensor:
            allowed = self.allowed(attention_mask, seq, keys)
            rows = allowed.gather(2, self.split.other[:, None, :, None].expand(-1, 1, -1, keys))
            return as_model_mask(rows, attention_mask, dtype)

        return self.derived(("other_mask", keys, dtype), (attention_mask,), compute)

    def clear(self) -> None:
        """Drop every tensor this call holds (the frozen run's buffer included)."""
        self.run = None
        self._derived.clear()


def open_call(layout: TokenLayout, device: torch.device, naavit_kernel: str = "gather",
              block_masks: NaavitBlockMasks | None = None) -> CallCache | None:
    """The :class:`CallCache` of one forward call whose token ``layout`` is given on the CPU, on
    ``device``; None when the call has no visual token (its layers run as usual).

    Every count that sizes a tensor (visual rows per sequence, the longest row run) is read from
    the CPU layout, so neither this nor any layer of the call waits for the device; the index
    tensors are then copied to ``device`` once.
    """
    if not bool(layout.visual.any()):
        return None
    split = RowSplit.from_layout(layout).to(device)
    return CallCache(layout.to(device), split, naavit_kernel=naavit_kernel, block_masks=block_masks)


def _attention_function(attn: torch.nn.Module) -> Callable:
    """The attention function the model's own attention module would call (sdpa or its eager one)."""
    implementation = attn.config._attn_implementation
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"layer modes run with attention implementations {SUPPORTED_ATTENTION}, not {implementation!r}; "
            "call model.set_attn_implementation('sdpa')"
        )
    if implementation == "eager":
        return sys.modules[type(attn).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[implementation]


def _check_rotary(position_embeddings) -> None:
    if position_embeddings is None or position_embeddings[0].dim() != 3:
        raise NotImplementedError(
            "eemllm's layer modes need the rotary tables a decoder layer gets as position_embeddings=(cos, sin), "
            "each [batch, seq, head_dim]; this model passes none or another form. Recompose them in its family's "
            "rotary module (as Qwen2-VL's M-RoPE does) or add a LayerStyle step for them in eemllm_models/anatomy.py"
        )


def _inert_capture_hook(hook: Callable) -> bool:
    """True for transformers' ``output_hidden_states`` capture hook while nothing is being captured."""
    if getattr(hook, "__name__", "") != "output_capturing_hook":
        return False
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    return not _active_collector.get()


def _hooked(layer: torch.nn.Module) -> bool:
    """Whether anything outside the layer may see its input or output tensor (module or global hooks)."""
    from torch.nn.modules import module as nn_module

    hooks = [*layer._forward_hooks.values(), *layer._forward_pre_hooks.values(),
             *nn_module._global_forward_hooks.values(), *nn_module._global_forward_pre_hooks.values()]
    return not all(_inert_capture_hook(h) for h in hooks)


@dataclass(frozen=True)
class _KeysValues:
    key: torch.Tensor  # [batch, kv_heads, keys, head_dim], past keys included
    value: torch.Tensor
    new_key: torch.Tensor  # [batch, seq, kv_heads, head_dim], this chunk only
    new_value: torch.Tensor


def _keys_values(layer, normed: torch.Tensor, rotary: Rotary, kv_cache) -> _KeysValues:
    """Keys (rotated) and values of every row of ``normed`` ``[batch, seq, hidden]``, into the KV cache."""
    attn = layer.self_attn
    style = style_of(layer)
    new_key = rotary.apply(style.keys(attn, normed))
    new_value = style.values(attn, normed)
    key, value = new_key.transpose(1, 2), new_value.transpose(1, 2)
    if kv_cache is not None:
        key, value = kv_cache.update(key, value, attn.layer_idx)
    return _KeysValues(key, value, new_key, new_value)


def _other_attention(layer, cache: CallCache, normed: torch.Tensor, kv: _KeysValues, attention_mask,
                     rotary: Rotary) -> torch.Tensor:
    """Attention output of the non-visual rows over every key, through the model's attention function:
    ``[batch, n_other, heads * head_dim]``."""
    attn = layer.self_attn
    batch, seq, _ = normed.shape
    other = cache.split.other_rows
    query = rotary.apply(style_of(layer).queries(attn, other.take(normed))).transpose(1, 2)
    keys = kv.key.shape[2]
    mask = cache.other_mask(attention_mask, seq, keys, query.dtype)
    out, _ = _attention_function(attn)(attn, query, kv.key, kv.value, mask, dropout=0.0, scaling=attn.scaling)
    return out.reshape(batch, other.n, -1)


def fast_forward(
    layer: torch.nn.Module,
    mode: str,
    layout: TokenLayout,
    split: RowSplit,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    call_cache: CallCache | None = None,
    **kwargs,
) -> torch.Tensor:
    """One decoder layer in ``mode`` (``frozen``, ``naavit`` or ``composite``), doing only the work it needs.

    Keys and values are computed for every row (and go into the layer's KV cache as usual);
    queries, attention, o_proj and MLP run for the rows ``mode`` keeps. ``call_cache``: the forward
    call's :class:`CallCache` (shared by its layers, it lets consecutive frozen layers continue a
    run); a fresh one for ``layout`` and ``split`` when None. ``kwargs``: the rest of the layer's
    keyword arguments (its KV cache among them). Returns ``[batch, seq, hidden]``.
    """
    _check_rotary(position_embeddings)
    cache = CallCache(layout, split) if call_cache is None else call_cache
    kv_cache = layer_kv_cache(kwargs)
    if mode == "frozen":
        return _frozen_forward(layer, cache, hidden_states, attention_mask, position_embeddings, kv_cache)
    if mode not in ("naavit", "composite"):
        raise ValueError(f"unknown fast mode {mode!r}")
    return _visual_forward(layer, mode, cache, hidden_states, attention_mask, position_embeddings, kv_cache)


def layer_kv_cache(kwargs: dict):
    """The KV cache among a decoder layer's keyword arguments: ``cache`` since transformers 5.24,
    ``past_key_values`` before; None when the call keeps none."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


def _frozen_forward(layer, cache: CallCache, hidden_states, attention_mask, position_embeddings,
                    kv_cache) -> torch.Tensor:
    """``frozen``: the text rows through the layer, the visual rows unchanged (see the module notes on runs)."""
    attn = layer.self_attn
    other = cache.split.other_rows
    run, cache.run = cache.run, None
    continuing = run is not None and run.continues(layer, hidden_states)
    text = run.text if continuing else other.take_ok(hidden_states)  # [1, n_ok, hidden]
    rotary = cache.rotary(position_embeddings)
    normed = layer.input_layernorm(hidden_states)
    kv = _keys_values(layer, normed, rotary.all, kv_cache)
    style = style_of(layer)
    attention = other.ok_slots(_other_attention(layer, cache, normed, kv, attention_mask, rotary.other))
    rows = style.feed_forward(layer, style.attention_residual(layer, text, attention))
    out = hidden_states if continuing else hidden_states.clone(memory_format=torch.contiguous_format)
    other.put_ok_(out, rows)
    if not out.requires_grad and not _hooked(layer):
        cache.run = _FrozenRun(out, _version(out), rows, attn.layer_idx + 1)
    return out


def _visual_forward(layer, mode: str, cache: CallCache, hidden_states, attention_mask, position_embeddings,
                    kv_cache) -> torch.Tensor:
    """``naavit`` and ``composite``: every row gets its update; visual queries see less (or nothing)."""
    attn = layer.self_attn
    batch, seq, _ = hidden_states.shape
    rotary = cache.rotary(position_embeddings)
    normed = layer.input_layernorm(hidden_states)
    kv = _keys_values(layer, normed, rotary.all, kv_cache)
    if mode == "naavit" and cache.naavit_kernel != "gather":
        attn_out = _naavit_flex(layer, cache, normed, kv, attention_mask, rotary.all)
    else:
        split = cache.split
        out_other = _other_attention(layer, cache, normed, kv, attention_mask, rotary.other)
        if mode == "composite":
            # A visual token attending only to itself: its own value, each query head reading its KV head.
            own_value = split.visual_rows.take(kv.new_value)  # [B, V, kv_heads, d]
            out_visual = own_value.repeat_interleave(attn.num_key_value_groups, dim=2).flatten(2)
        else:
            out_visual = _naavit_visual_attention(layer, cache, normed, kv, attention_mask, rotary.visual)
        attn_out = out_other.new_zeros(batch, seq, out_other.shape[-1])  # padding rows stay 0
        split.other_rows.put_(attn_out, out_other)
        split.visual_rows.put_(attn_out, out_visual)
    style = style_of(layer)
    return style.feed_forward(layer, style.attention_residual(layer, hidden_states, attn_out))


def _naavit_selection(cache: CallCache, attention_mask, seq: int, keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys a visual query may score besides itself: ``key_index`` ``[batch, past + n_other]`` (earlier
    keys and this chunk's non-visual keys) and their mask ``[batch, 1, n_visual, past + n_other]``."""
    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        split = cache.split
        batch, past = split.other.shape[0], keys - seq
        device = split.other.device
        allowed = cache.allowed(attention_mask, seq, keys)
        key_index = torch.cat([torch.arange(past, device=device).expand(batch, -1), split.other + past], dim=1)
        rows_mask = allowed.gather(2, split.visual[:, None, :, None].expand(-1, 1, -1, keys))
        sel_mask = rows_mask.gather(3, key_index[:, None, None, :].expand(-1, 1, split.visual.shape[1], -1))
        valid_key = torch.cat([torch.ones(batch, past, dtype=torch.bool, device=device), split.other_ok], dim=1)
        return key_index, sel_mask & valid_key[:, None, None, :]

    return cache.derived(("naavit_selection", keys), (attention_mask,), compute)


def _naavit_visual_attention(layer, cache: CallCache, normed, kv: _KeysValues, attention_mask,
                             rotary: Rotary) -> torch.Tensor:
    """Visual queries against earlier keys, this chunk's non-visual keys and themselves: ``[batch, n_visual, heads*head_dim]``.

    Scores are formed only for those keys, so the visual x visual block is never computed.
    """
    attn = layer.self_attn
    seq = normed.shape[1]
    keys, head_dim, groups = kv.key.shape[2], attn.head_dim, attn.num_key_value_groups
    visual = cache.split.visual_rows
    q = rotary.apply(style_of(layer).queries(attn, visual.take(normed))).transpose(1, 2)
    key_index, sel_mask = _naavit_selection(cache, attention_mask, seq, keys)
    expand = key_index[:, None, :, None].expand(-1, kv.key.shape[1], -1, head_dim)
    k_sel = repeat_kv(kv.key.gather(2, expand), groups)  # [B, H, P+N, d]
    v_sel = repeat_kv(kv.value.gather(2, expand), groups)
    self_k = repeat_kv(visual.take(kv.new_key).transpose(1, 2), groups)  # [B, H, V, d]
    self_v = repeat_kv(visual.take(kv.new_value).transpose(1, 2), groups)
    scores = torch.matmul(q, k_sel.transpose(2, 3)) * attn.scaling
    scores = scores.masked_fill(~sel_mask, torch.finfo(scores.dtype).min)
    self_score = (q * self_k).sum(-1, keepdim=True) * attn.scaling
    probs = torch.softmax(torch.cat([scores, self_score], dim=-1), dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs[..., :-1], v_sel) + probs[..., -1:] * self_v  # [B, H, V, d]
    return out.transpose(1, 2).flatten(2)


def _naavit_flex(layer, cache: CallCache, normed, kv: _KeysValues, attention_mask, rotary: Rotary) -> torch.Tensor:
    """``naavit`` attention of every row with FlexAttention under the layout's block mask:
    ``[batch, seq, heads * head_dim]``."""
    attn = layer.self_attn
    batch, seq, _ = normed.shape
    query = rotary.apply(style_of(layer).queries(attn, normed)).transpose(1, 2)
    keys = kv.key.shape[2]
    block_mask = cache.derived(("block_mask", keys), (attention_mask,), lambda: cache.block_masks.get(
        cache.layout, cache.allowed(attention_mask, seq, keys)))
    flex = _flex_attention(eager=cache.naavit_kernel == "flex_eager")
    out = flex(query, kv.key, kv.value, block_mask=block_mask, scale=attn.scaling,
               enable_gqa=kv.key.shape[1] != query.shape[1])
    return out.transpose(1, 2).reshape(batch, seq, -1)


def reference_forward(
    layer: torch.nn.Module,
    original: Callable[..., torch.Tensor],
    mode: str,
    layout: TokenLayout,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """The obvious version of ``mode``: the original layer, then the visual rows put back
    (``frozen``), or under a 4D mask (``naavit``, ``composite``). Returns ``[batch, seq, hidden]``."""
    if mode == "frozen":
        out = original(hidden_states, attention_mask=attention_mask, **kwargs)
        return torch.where(layout.visual[..., None], hidden_states, out)
    batch, seq, _ = hidden_states.shape
    keys = _key_count(layer, seq, attention_mask, layer_kv_cache(kwargs))
    allowed = allowed_keys(attention_mask, batch, seq, keys, hidden_states.device)
    mask = as_model_mask(mode_mask(mode, layout, allowed), attention_mask, hidden_states.dtype)
    return original(hidden_states, attention_mask=mask, **kwargs)


def _key_count(layer: torch.nn.Module, seq: int, attention_mask: torch.Tensor | None, kv_cache) -> int:
    """How many keys the layer's attention sees for ``seq`` new tokens: the width of the model's mask, or
    the KV cache's own count for this layer (a sliding-window layer's cache keeps only its window)."""
    if attention_mask is not None:
        return attention_mask.shape[-1]
    if kv_cache is None:
        return seq
    return kv_cache.get_mask_sizes(seq, layer.self_attn.layer_idx)[0]
