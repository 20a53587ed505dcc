"""Decoder-layer forwards that run one mode for visual tokens: fast paths and their references.

Every function here takes the decoder layer (a Llama-style layer: ``input_layernorm``,
``self_attn.{q,k,v,o}_proj``, ``post_attention_layernorm``, ``mlp``) and the arguments the
model passes to it, plus the batch's :class:`~eemllm_models.layout.TokenLayout`. Shapes:
``hidden_states`` ``[batch, seq, hidden]``; ``attention_mask`` is whatever the model built for
its attention implementation: ``None`` (plain causal), a bool ``[batch|1, 1, seq, keys]``
(``sdpa``: True = attend) or an additive float mask of that shape (``eager``).

The references are the obvious versions: ``frozen`` runs the full layer and puts the visual
rows back (what the ShortV HF port does, no savings); ``naavit`` and ``composite`` run the full
layer under a 4D mask (visual queries see no other visual key / only themselves). The fast paths
do less work: queries, o_proj and MLP only for the rows that need them, and visual queries of
``naavit`` scored only against non-visual keys.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import repeat_kv, rotate_half

from .layout import TokenLayout

SUPPORTED_ATTENTION = ("sdpa", "eager")


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` ``[batch, seq, ...]`` at positions ``index`` ``[batch, n]`` -> ``[batch, n, ...]``."""
    expanded = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, expanded)


@dataclass(frozen=True)
class RowSplit:
    """A layout's positions as padded index tensors ``[batch, n]`` (visual rows, other rows).

    "Other" rows are text and padding: everything a visual mode leaves in full. Slots past a
    sequence's count (``*_ok`` False) point at some position of the other kind and are ignored.
    """

    visual: torch.Tensor
    visual_ok: torch.Tensor
    other: torch.Tensor
    other_ok: torch.Tensor

    @classmethod
    def from_layout(cls, layout: TokenLayout) -> RowSplit:
        flags = layout.visual.to(torch.int8)
        n_visual = int(layout.n_visual.max())
        n_other = int((layout.visual.shape[1] - layout.n_visual).max())
        visual_first = torch.argsort(-flags, dim=1, stable=True)
        other_first = torch.argsort(flags, dim=1, stable=True)
        return cls(
            visual=visual_first[:, :n_visual],
            visual_ok=torch.arange(n_visual, device=flags.device) < layout.n_visual[:, None],
            other=other_first[:, :n_other],
            other_ok=torch.arange(n_other, device=flags.device) < (flags.shape[1] - layout.n_visual)[:, None],
        )


def _scatter_rows(out: torch.Tensor, index: torch.Tensor, ok: torch.Tensor, rows: torch.Tensor) -> None:
    """``out[b, index[b, i]] = rows[b, i]`` for the slots where ``ok``; in place."""
    batch = torch.arange(out.shape[0], device=out.device)[:, None].expand_as(index)
    out[batch[ok], index[ok]] = rows[ok].to(out.dtype)


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


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[batch, n, heads * head_dim]`` -> ``[batch, heads, n, head_dim]``."""
    return x.view(*x.shape[:2], -1, head_dim).transpose(1, 2)


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


def _check_llama_style(position_embeddings) -> None:
    if position_embeddings is None or position_embeddings[0].dim() != 3:
        raise NotImplementedError(
            "eemllm's layer modes support decoders with Llama-style rotary embeddings (LLaVA, LLaVA-NeXT, "
            "Mistral/Qwen2 text models); this model passes a different position embedding (e.g. Qwen2-VL's M-RoPE)"
        )


def fast_forward(
    layer: torch.nn.Module,
    mode: str,
    layout: TokenLayout,
    split: RowSplit,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    past_key_values=None,
    **kwargs,
) -> torch.Tensor:
    """One decoder layer in ``mode`` (``frozen``, ``naavit`` or ``composite``), doing only the work it needs.

    Keys and values are computed for every row (and go into the KV cache as usual); queries,
    attention, o_proj and MLP run for the rows ``mode`` keeps. Returns ``[batch, seq, hidden]``.
    """
    _check_llama_style(position_embeddings)
    attn = layer.self_attn
    batch, seq, _ = hidden_states.shape
    head_dim = attn.head_dim
    cos, sin = (t.expand(batch, -1, -1) for t in position_embeddings)

    normed = layer.input_layernorm(hidden_states)
    key = rotate(split_heads(attn.k_proj(normed), head_dim), cos, sin)
    value = split_heads(attn.v_proj(normed), head_dim)
    if past_key_values is not None:
        key, value = past_key_values.update(key, value, attn.layer_idx)
    keys = key.shape[2]
    allowed = allowed_keys(attention_mask, batch, seq, keys, hidden_states.device)

    # Non-visual rows (text, padding): full attention over every key, through the model's attention function.
    other = split.other
    q_other = rotate(split_heads(attn.q_proj(gather_rows(normed, other)), head_dim),
                      gather_rows(cos, other), gather_rows(sin, other))
    other_mask = allowed.gather(2, other[:, None, :, None].expand(-1, 1, -1, keys))
    attention = _attention_function(attn)
    out_other, _ = attention(attn, q_other, key, value, as_model_mask(other_mask, attention_mask, q_other.dtype),
                             dropout=0.0, scaling=attn.scaling)
    out_other = out_other.reshape(batch, other.shape[1], -1)

    if mode == "frozen":
        rows = gather_rows(hidden_states, other) + attn.o_proj(out_other)
        rows = rows + layer.mlp(layer.post_attention_layernorm(rows))
        out = hidden_states.clone()
        _scatter_rows(out, other, split.other_ok, rows)
        return out

    visual = split.visual
    if mode == "composite":
        # A visual token attending only to itself: its own value, each query head reading its KV head.
        own_value = repeat_kv(value[:, :, keys - seq:], attn.num_key_value_groups)
        out_visual = gather_rows(own_value.transpose(1, 2), visual).flatten(2)
    elif mode == "naavit":
        out_visual = _naavit_visual_attention(attn, normed, key, value, allowed, split, cos, sin)
    else:
        raise ValueError(f"unknown fast mode {mode!r}")
    attn_out = torch.empty(batch, seq, out_other.shape[-1], dtype=out_other.dtype, device=out_other.device)
    _scatter_rows(attn_out, other, split.other_ok, out_other)
    _scatter_rows(attn_out, visual, split.visual_ok, out_visual)
    out = hidden_states + attn.o_proj(attn_out)
    return out + layer.mlp(layer.post_attention_layernorm(out))


def _naavit_visual_attention(attn, normed, key, value, allowed, split: RowSplit, cos, sin) -> torch.Tensor:
    """Visual queries against earlier keys, this chunk's non-visual keys and themselves: ``[batch, n_visual, heads*head_dim]``.

    Scores are formed only for those keys, so the visual x visual block is never computed.
    """
    batch, seq, _ = normed.shape
    keys, head_dim = key.shape[2], attn.head_dim
    past = keys - seq
    visual, other = split.visual, split.other
    q = rotate(split_heads(attn.q_proj(gather_rows(normed, visual)), head_dim),
                gather_rows(cos, visual), gather_rows(sin, visual))  # [B, H, V, d]
    key_index = torch.cat([torch.arange(past, device=key.device).expand(batch, -1), other + past], dim=1)
    k_sel = repeat_kv(key.gather(2, key_index[:, None, :, None].expand(-1, key.shape[1], -1, head_dim)),
                      attn.num_key_value_groups)  # [B, H, P+N, d]
    v_sel = repeat_kv(value.gather(2, key_index[:, None, :, None].expand(-1, value.shape[1], -1, head_dim)),
                      attn.num_key_value_groups)
    rows_mask = allowed.gather(2, visual[:, None, :, None].expand(-1, 1, -1, keys))
    sel_mask = rows_mask.gather(3, key_index[:, None, None, :].expand(-1, 1, visual.shape[1], -1))
    valid_key = torch.cat([torch.ones(batch, past, dtype=torch.bool, device=key.device), split.other_ok], dim=1)
    sel_mask = sel_mask & valid_key[:, None, None, :]
    self_k = repeat_kv(gather_rows(key[:, :, past:].transpose(1, 2), visual).transpose(1, 2),
                       attn.num_key_value_groups)
    self_v = repeat_kv(gather_rows(value[:, :, past:].transpose(1, 2), visual).transpose(1, 2),
                       attn.num_key_value_groups)
    scores = torch.matmul(q, k_sel.transpose(2, 3)) * attn.scaling
    scores = scores.masked_fill(~sel_mask, torch.finfo(scores.dtype).min)
    self_score = (q * self_k).sum(-1, keepdim=True) * attn.scaling
    probs = torch.softmax(torch.cat([scores, self_score], dim=-1), dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs[..., :-1], v_sel) + probs[..., -1:] * self_v  # [B, H, V, d]
    return out.transpose(1, 2).flatten(2)


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
    past = kwargs.get("past_key_values")
    keys = seq + (past.get_seq_length(layer.self_attn.layer_idx) if past is not None else 0)
    allowed = allowed_keys(attention_mask, batch, seq, keys, hidden_states.device)
    mask = as_model_mask(mode_mask(mode, layout, allowed), attention_mask, hidden_states.dtype)
    return original(hidden_states, attention_mask=mask, **kwargs)
