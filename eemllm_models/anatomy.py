"""What a decoder layer is made of, per decoder style, and the steps the layer modes take through it.

The layer modes (:mod:`eemllm_models.modes`) and the attention probe never reach into a layer's
attention module directly: they form queries, keys and values through the layer's
:class:`LayerStyle`, and use only the parts every style has (``input_layernorm``,
``self_attn.o_proj``, ``post_attention_layernorm``, ``mlp``, the rotary ``cos``/``sin`` the model
passes). A style is recognised from the layer's parts, and a layer that matches none is refused
naming what was not recognised, so one architecture's recipe never runs on another's layer.

Styles:

- ``llama`` (Llama, Mistral, Qwen2, Qwen2-VL's decoder): pre-norm, ``q_proj``/``k_proj``/``v_proj``/
  ``o_proj``, rotary on queries and keys, post-attention norm before the MLP.
- ``qwen3`` (Qwen3, Qwen3-VL's decoder): the same, with per-head RMS norms ``q_norm``/``k_norm`` on
  the queries and keys before the rotary embedding.

Shapes: ``normed`` ``[batch, n, hidden]`` in, ``[batch, n, heads, head_dim]`` out (before rotary).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

LAYER_PARTS = frozenset({"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"})
"""The parts of a decoder layer every style has, and no others."""
ATTENTION_PARTS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})


@dataclass(frozen=True)
class LayerStyle:
    """One decoder style: its name, the attention parts beyond :data:`ATTENTION_PARTS` it has, and how
    queries, keys and values are formed from the pre-attention-normed hidden states."""

    name: str
    head_norms: bool
    extra_attention_parts: frozenset[str]

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


STYLES = (
    LayerStyle("llama", head_norms=False, extra_attention_parts=frozenset()),
    LayerStyle("qwen3", head_norms=True, extra_attention_parts=frozenset({"q_norm", "k_norm"})),
)
_KNOWN: weakref.WeakKeyDictionary[torch.nn.Module, LayerStyle] = weakref.WeakKeyDictionary()


def style_of(layer: torch.nn.Module) -> LayerStyle:
    """The :class:`LayerStyle` of a decoder layer (as :func:`recognise_style` last found it)."""
    style = _KNOWN.get(layer)
    return recognise_style(layer) if style is None else style


def recognise_style(layer: torch.nn.Module) -> LayerStyle:
    """Read a decoder layer's parts and return its :class:`LayerStyle`, or raise ``NotImplementedError``
    naming the parts no style has (e.g. Gemma 3's ``pre_feedforward_layernorm``) and what to add.
    Applying a plan calls it for every layer the plan changes; the layers' forwards then use the result."""
    attn = getattr(layer, "self_attn", None)
    parts = {name for name, _ in layer.named_children()}
    attention = set() if attn is None else {name for name, _ in attn.named_children()}
    for style in STYLES:
        if parts == LAYER_PARTS and attention == ATTENTION_PARTS | style.extra_attention_parts:
            _KNOWN[layer] = style
            return style
    unknown = sorted((parts - LAYER_PARTS) | {f"self_attn.{p}" for p in attention - ATTENTION_PARTS
                                              - frozenset().union(*(s.extra_attention_parts for s in STYLES))})
    missing = sorted((LAYER_PARTS - parts) | {f"self_attn.{p}" for p in ATTENTION_PARTS - attention})
    found = "; ".join(([f"unrecognised parts {unknown}"] if unknown else [])
                      + ([f"missing parts {missing}"] if missing else [])) or (
        f"its attention parts {sorted(attention)} match no style as a whole")
    raise NotImplementedError(
        f"eemllm's layer modes do not recognise the decoder layer {type(layer).__name__}: {found}"
        + f" (known styles: {', '.join(s.name for s in STYLES)}). Add a LayerStyle for it in "
        "eemllm_models/anatomy.py, with the steps its attention and feed-forward take")
