"""What a decoder layer is made of, per decoder style, and the steps the layer modes take through it.

The layer modes (:mod:`eemllm_models.modes`) and the attention probe never reach into a layer's
parts directly: they go through the layer's :class:`LayerStyle`, a handful of small steps (form
queries, keys and values from the pre-attention-normed hidden states; finish the attention into
the residual; the feed-forward block into the residual), and use only what every style has besides
(``input_layernorm``, ``self_attn.o_proj``, ``self_attn.scaling``, the rotary ``cos``/``sin`` and the
mask the model passes). A style is recognised from the layer's parts, and a layer that matches
none is refused naming what was not recognised, so one architecture's recipe never runs on
another's layer.

Styles:

- ``llama`` (Llama, Mistral, Qwen2, Qwen2-VL's decoder): pre-norm, ``q_proj``/``k_proj``/``v_proj``/
  ``o_proj``, rotary on queries and keys, post-attention norm before the MLP.
- ``qwen3`` (Qwen3, Qwen3-VL's decoder): the same, with per-head RMS norms ``q_norm``/``k_norm`` on
  the queries and keys before the rotary embedding.
- ``gemma3`` (Gemma 3): per-head ``q_norm``/``k_norm`` too; sandwich norms: ``post_attention_layernorm``
  normalises the attention *output* before the residual, and ``pre_feedforward_layernorm`` /
  ``post_feedforward_layernorm`` wrap the MLP. Its other differences need no step of their own: the
  query scale (``query_pre_attn_scalar``) is the module's ``scaling``; sliding-window and global
  layers differ only in the mask and rotary tables the model passes each layer; an image's
  bidirectional block is part of that mask. Attention-logit soft-capping (Gemma 2) is refused.

Shapes: ``normed`` ``[batch, n, hidden]`` in, ``[batch, n, heads, head_dim]`` out (before rotary);
``residual``/``hidden`` ``[batch, n, hidden]``, ``attention`` ``[batch, n, heads * head_dim]``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

LAYER_PARTS = frozenset({"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"})
"""The parts of a decoder layer every style has."""
ATTENTION_PARTS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})
SANDWICH_PARTS = frozenset({"pre_feedforward_layernorm", "post_feedforward_layernorm"})


@dataclass(frozen=True)
class LayerStyle:
    """One decoder style: its name, the parts beyond :data:`LAYER_PARTS` / :data:`ATTENTION_PARTS` it
    has, and the steps a layer of this style takes (see the module notes)."""

    name: str
    head_norms: bool
    sandwich_norms: bool
    extra_attention_parts: frozenset[str]
    extra_layer_parts: frozenset[str] = frozenset()

    def queries(self, attn: torch.nn.Module, normed: torch.Tensor) -> torch.Tensor:
        """Queries ``[batch, n, heads, head_dim]`` of ``normed`` ``[batch, n, hidden]``, before rotary."""
        query = attn.q_proj(normed).view(*normed.shape[:2], -1, attn.head_dim)
        return attn.q_norm(query) if self.head_norms else query

    def keys(self, attn: torch.nn.Module, normed: torch.Tensor) -> torch.Tensor:
        """Keys ``[batch, n, kv_heads, head_dim]`` of ``normed``, before rotary."""
        key = attn.k_proj(normed).view(*normed.shape[:2], -1, attn.head_dim)
        return attn.k_norm(key) if self.head_norms else key

    def values(self, attn: torch.nn.Module, normed: torch.Tensor) -> torch.Tensor:
        """Values ``[batch, n, kv_heads, head_dim]`` of ``normed``."""
        return attn.v_proj(normed).view(*normed.shape[:2], -1, attn.head_dim)

    def attention_residual(self, layer: torch.nn.Module, residual: torch.Tensor,
                           attention: torch.Tensor) -> torch.Tensor:
        """``residual`` plus the layer's attention update: ``o_proj`` of ``attention`` (the heads'
        weighted values), normed first in the sandwich style. ``[batch, n, hidden]``."""
        update = layer.self_attn.o_proj(attention)
        return residual + (layer.post_attention_layernorm(update) if self.sandwich_norms else update)

    def feed_forward(self, layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` plus the feed-forward update of ``hidden`` ``[batch, n, hidden]``."""
        if self.sandwich_norms:
            return hidden + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(hidden)))
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


_HEAD_NORMS = frozenset({"q_norm", "k_norm"})
STYLES = (
    LayerStyle("llama", head_norms=False, sandwich_norms=False, extra_attention_parts=frozenset()),
    LayerStyle("qwen3", head_norms=True, sandwich_norms=False, extra_attention_parts=_HEAD_NORMS),
    LayerStyle("gemma3", head_norms=True, sandwich_norms=True, extra_attention_parts=_HEAD_NORMS,
               extra_layer_parts=SANDWICH_PARTS),
)
_KNOWN: weakref.WeakKeyDictionary[torch.nn.Module, LayerStyle] = weakref.WeakKeyDictionary()


def style_of(layer: torch.nn.Module) -> LayerStyle:
    """The :class:`LayerStyle` of a decoder layer (as :func:`recognise_style` last found it)."""
    style = _KNOWN.get(layer)
    return recognise_style(layer) if style is None else style


def recognise_style(layer: torch.nn.Module) -> LayerStyle:
    """Read a decoder layer's parts and return its :class:`LayerStyle`, or raise ``NotImplementedError``
    naming, against the nearest style, the parts it has no step for and those it lacks, and what to add.
    Applying a plan calls it for every layer the plan changes; the layers' forwards then use the result."""
    attn = getattr(layer, "self_attn", None)
    parts = {name for name, _ in layer.named_children()}
    attention = set() if attn is None else {name for name, _ in attn.named_children()}
    if getattr(attn, "attn_logit_softcapping", None) is not None:
        raise NotImplementedError(
            f"eemllm's layer modes do not support the attention-logit soft cap of {type(layer).__name__} "
            f"(attn_logit_softcapping={attn.attn_logit_softcapping}, as in Gemma 2): the fast paths call the "
            "attention kernels without it. Add the cap to the LayerStyle's steps in eemllm_models/anatomy.py")
    for style in STYLES:
        if (parts == LAYER_PARTS | style.extra_layer_parts
                and attention == ATTENTION_PARTS | style.extra_attention_parts):
            _KNOWN[layer] = style
            return style
    have = parts | {f"self_attn.{p}" for p in attention}

    def expected(style: LayerStyle) -> set[str]:
        return set(LAYER_PARTS | style.extra_layer_parts) | {
            f"self_attn.{p}" for p in ATTENTION_PARTS | style.extra_attention_parts}

    nearest = min(STYLES, key=lambda style: len(expected(style) ^ have))
    unknown, missing = sorted(have - expected(nearest)), sorted(expected(nearest) - have)
    found = "; ".join([f"unrecognised parts {unknown}"] * bool(unknown) + [f"missing parts {missing}"] * bool(missing))
    raise NotImplementedError(
        f"eemllm's layer modes do not recognise the decoder layer {type(layer).__name__}: {found}, against "
        f"the nearest style {nearest.name!r} (known styles: {', '.join(s.name for s in STYLES)}). Add a LayerStyle for it in "
        "eemllm_models/anatomy.py, with the steps its attention and feed-forward take")
