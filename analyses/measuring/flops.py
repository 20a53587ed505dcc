"""FLOPs of a multimodal model under an :class:`~eemllm_models.EfficiencyPlan`, counted analytically.

Two conventions, both from the model config, the plan and the prompt's :class:`TokenCounts`
(``t`` text tokens, ``v`` visual tokens, ``n = t + v``; ``h`` hidden size, ``m`` MLP size). A
multiply-add counts 2 FLOPs: a ``[rows, in] x [in, out]`` product is ``2 * rows * in * out``.

**ShortV's convention** (:func:`shortv_convention_flops`, and :func:`layer_flops` /
:func:`plan_flops` / :func:`flops_ratio` for every mode): prefill of the decoder layers only,
attention projections, attention scores and MLP, every key of the sequence counted for every
query (causal or not). Per ``full`` layer ``2(t+v)(4h+3m)h + 4(t+v)^2 h``; per ``frozen`` layer
``2t(4h+3m)h + 4vh^2 + 4t(t+v)h`` (keys and values of visual tokens are still projected).
``layer_flops`` generalises it to grouped-query attention and to ``naavit`` (visual queries
score every text key and themselves) and ``composite`` (no visual queries).

:func:`flops_figures` gives both conventions' figures for a plan (what the demo, the report, ``eemllm
plan`` and a plan's provenance show), :data:`CONVENTIONS` names them and :func:`format_flops` prints
an amount in the unit that shows it (MFLOPs for the embedded model, TFLOPs for LLaVA-1.5-7B).

**The full count** (:func:`full_flops`) is what a real ``model.generate()`` computes with the
plan applied by its fast implementation (``plan.applied(model)``): the vision tower, the
projector, every decoder layer, the final norm and lm_head, for the prefill and for each decoded
token, as a tidy frame split by part, layer and component.

- Decoders: every style of :mod:`eemllm_models.anatomy` (:data:`DECODER_STYLES`, chosen from the
  text config's ``model_type`` by :func:`decoder_style`), so the decoder of every supported family
  is counted: ``llama`` (Llama, Mistral, Qwen2, Qwen2-VL/2.5-VL's decoders: LLaVA, LLaVA-NeXT,
  -Video, OneVision, InternVL, Idefics3, SmolVLM, Mistral 3, Qwen2-VL, Qwen2.5-VL), ``qwen3``
  (Qwen3, Qwen3-VL's decoder: per-head ``q_norm``/``k_norm``, element-wise work only) and
  ``gemma3`` (q/k norms; a norm on the attention output and pre- and post-feed-forward norms;
  embeddings scaled by ``sqrt(hidden)``; GELU-tanh; optional attention and final logit
  soft-capping; ``query_pre_attn_scalar`` only changes the scale inside attention). The matrix
  products are the same in every style. Sliding-window layers (Gemma 3, Mistral) attend densely
  in the prefill (their mask does not shrink the dense ``sdpa`` work), and while decoding their
  KV cache keeps the last ``sliding_window`` keys (:meth:`DecoderShape.decode_keys`). Qwen3-VL's
  deepstack features added to the visual rows between layers count as additions. A decoder no
  style covers (e.g. Qwen3-VL-MoE's) is refused with ``NotImplementedError``; its matrix products
  in ShortV's convention (:func:`layer_flops`) are still counted.
- Towers on fixed-size images, whose cost the token counts give (:func:`visual_tokens_per_image`):
  LLaVA-1.5's CLIP tower and projector (every image resized to the tower's ``image_size``, so an
  image is ``(image_size / patch_size)^2`` visual tokens; HF runs every tower layer, even those
  after ``vision_feature_layer``); Gemma 3's SigLIP (``mm_tokens_per_image`` tokens per image,
  pan-and-scan crops included; its attention-pooling head where ``vision_use_head`` is set, whose
  output is unused, and the projector's average pooling, RMS norm and projection); Idefics3's and
  SmolVLM's SigLIP-style tower, once per sub-image (``(image_size / patch_size)^2 /
  scale_factor^2`` tokens each; the processor splits an image into sub-images and a global image),
  and their pixel-shuffle connector. Other towers are refused with ``NotImplementedError`` naming
  the tower: LLaVA-NeXT(-Video)'s and OneVision's anyres tiles, Qwen2-VL's, Qwen2.5-VL's,
  Qwen3-VL's and Pixtral's (Mistral 3) native resolution (attention within each image depends on
  its own grid, which token counts do not give), and InternVL's InternViT (not written yet: its
  class token, layer scale and optional q/k norms, once per tile); count their language
  model with ``parts=("decoder", "lm_head")`` (:func:`countable_parts` says which parts a
  config's count covers).

- Matrix products (what ``torch.utils.flop_counter.FlopCounterMode`` counts; the rows
  :func:`matmul_flops` selects): ``q_proj``, ``kv_proj``, ``o_proj``, ``attention`` (scores and
  the weighted sum of values, ``4 * queries * keys * heads * head_dim``), ``mlp``, the tower's
  ``patch_embed`` convolution and SigLIP's attention-pooling ``head``, the projector's
  ``linear_1``/``linear_2`` (LLaVA) or ``projection`` (Gemma 3, Idefics3, SmolVLM) and ``lm_head``.
  Attention kernels compute dense blocks, so a causal mask saves nothing: a full layer scores
  ``n * n`` pairs. ``naavit``'s fast path (its default ``gather`` kernel) scores each visual
  query against every non-visual key of the prompt (the causal mask drops the later ones
  afterwards) and its own key; the ``flex`` kernel's block-sparse work is not modelled here.
- Element-wise work, counted with the per-element costs of :data:`ELEMENTWISE_FLOPS` and
  :data:`ACTIVATION_FLOPS` (conventions, not measurements): ``norm``, ``qk_norm`` (per-head q/k
  norms), ``rotary``, ``softmax``, ``softcap``, ``activation``, ``residual``, ``bias``, ``scale``
  (scaled embeddings), ``position_embed``, ``pool``, and ``attention_self`` (``naavit``'s
  score of a visual query against its own key and the weighted own value, ``4 * heads * head_dim``
  per visual token, done with element-wise products).

**Withdrawn and pruned visual tokens** (a plan's ``visual_keep``, :mod:`eemllm_models.withdrawal`): in
both conventions each layer counts the tokens it still sees (:func:`layer_tokens`: every text token
and ``floor(keep * visual)`` visual ones). In the full count, a decoded token attends, in each layer,
over that layer's shorter KV cache (its kept positions plus the tokens decoded so far), and the layer
before each drop ranked by ``attention`` (FastV) also counts the ranking: one query row, every row's
key and one row of scores (:func:`_ranking`); the ShortV convention leaves the ranking out, as
FastV's own count does. :mod:`analyses.measuring.memory` counts the KV cache's bytes the same way.

The prefill's lm_head covers ``logits_to_keep`` positions: ``generate()`` passes 1 (only the last
position's logits); a plain ``model(**batch)`` call computes all of them (``logits_to_keep=0``).
Decoded tokens are text, so every decoder layer runs ``full`` for them, attending to the cache.
The count is per prompt; a padded batch also computes padding rows. :func:`layer_flops`,
:func:`plan_flops` and :func:`flops_ratio` are the decoder's matrix-product part of it.

:func:`cross_check` holds the two together: it counts a real ``generate()`` under the plan with
:func:`flop_counter` (``FlopCounterMode`` plus CPU ``sdpa``), splits the counts by module
(:func:`counted_flops`: the decoder at the family's language model, ``model.language_model`` or
``model.text_model``) and sets them beside :func:`matmul_flops`; on the tiny model of every family
in ``tests/tiny_models.py`` and on the shipped LLaVA model they agree exactly, per layer and
component, in every mode (``tests/test_flops.py``).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from eemllm_models import EfficiencyPlan, TokenLayout, token_layout
from eemllm_models.anatomy import STYLES as LAYER_STYLES
from eemllm_models.anatomy import LayerStyle
from eemllm_models.withdrawal import kept_counts

COMPONENTS = ("q_proj", "kv_proj", "o_proj", "attention", "mlp")
PARTS = ("vision_tower", "projector", "decoder", "lm_head")
MATMUL_COMPONENTS = frozenset(COMPONENTS) | {"patch_embed", "head", "linear_1", "linear_2", "projection", "lm_head"}
"""Components made of matrix products: the ones ``FlopCounterMode`` counts."""
ELEMENTWISE_FLOPS = {
    "rms_norm": 4,  # per element: square, sum, scale, weight
    "layer_norm": 7,  # per element: mean, subtract, square, sum, scale, weight, bias
    "rotary": 3,  # per rotated q/k element: x*cos, rotate_half(x)*sin, add
    "rotary_table": 3,  # per (position, head_dim) entry of the cos/sin table: frequency, cos, sin
    "softmax": 5,  # per score: scale, max, subtract-and-exp, sum, divide
    "residual": 1,  # per element added
    "bias": 1,  # per output element of a linear layer with a bias
    "position_embed": 1,  # per element of the tower's embeddings
    "gate": 1,  # per MLP element: act(gate) * up
    "pool": 1,  # per element averaged by a pooling layer
    "softcap": 3,  # per capped logit or score: divide by the cap, tanh, multiply by the cap
    "scale": 1,  # per element multiplied by a constant (Gemma 3's embeddings by sqrt(hidden))
}
"""FLOPs per element of the element-wise operations of :func:`full_flops` (a convention)."""
ACTIVATION_FLOPS = {"silu": 4, "quick_gelu": 5, "gelu": 8, "gelu_new": 8, "gelu_pytorch_tanh": 8, "relu": 1}
"""FLOPs per element of each activation (``x * sigmoid(x)`` is 4: exp, add, divide, multiply)."""


@dataclass(frozen=True)
class DecoderStyle:
    """A decoder style of :mod:`eemllm_models.anatomy` as the FLOPs count sees it, from a config alone:
    the anatomy's :class:`~eemllm_models.anatomy.LayerStyle` (``layer``: its ``head_norms``, per-head
    RMS norms on queries and keys, and ``sandwich_norms``, Gemma 3's norm on the attention output and
    its pre- and post-feed-forward norms: three norms of the layer's output rows instead of one), the
    text configs' ``model_type`` values of this style, and ``scaled_embeddings`` (token embeddings
    multiplied by ``sqrt(hidden)``). Every style has the same matrix products: q/k/v/o projections,
    attention, a gated MLP; the styles differ in element-wise work.
    """

    layer: LayerStyle
    model_types: tuple[str, ...]
    scaled_embeddings: bool = False

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def head_norms(self) -> bool:
        return self.layer.head_norms

    @property
    def sandwich_norms(self) -> bool:
        return self.layer.sandwich_norms


_LAYER_STYLES = {style.name: style for style in LAYER_STYLES}
DECODER_STYLES = (
    DecoderStyle(_LAYER_STYLES["llama"], ("llama", "mistral", "qwen2", "qwen2_vl_text", "qwen2_5_vl_text")),
    DecoderStyle(_LAYER_STYLES["qwen3"], ("qwen3", "qwen3_vl_text")),
    DecoderStyle(_LAYER_STYLES["gemma3"], ("gemma3_text",), scaled_embeddings=True),
)
"""The decoder styles :func:`full_flops` counts, each with the text model types it covers."""
_QKV_BIAS_DECODERS = ("qwen2", "qwen2_vl_text", "qwen2_5_vl_text")
"""Text model types whose q/k/v projections have a bias though their config names no ``attention_bias``."""


def decoder_style(config: PretrainedConfig) -> DecoderStyle | None:
    """The :class:`DecoderStyle` of a config's decoder (its ``text_config``), or None when no style covers it."""
    model_type = getattr(config.get_text_config(), "model_type", None)
    return next((s for s in DECODER_STYLES if model_type in s.model_types), None)


_UNSUPPORTED_VISION = {
    "llava_next": "anyres tiling (a base image and crops per image, unpadding and image-newline tokens)",
    "llava_next_video": "anyres tiling of images and pooled video frames",
    "llava_onevision": "anyres tiling (crops per image, pooling and image-newline tokens)",
    "qwen2_vl": "native-resolution ViT with 2x2 patch merging",
    "qwen2_5_vl": "native-resolution windowed ViT with 2x2 patch merging",
    "qwen3_vl": "native-resolution ViT with interpolated position embeddings, 2x2 patch merging and deepstack "
                "mergers",
    "internvl": "InternViT on dynamic tiles with pixel shuffle, not written yet",
    "mistral3": "Pixtral's native-resolution tower with 2D rotary embeddings and a patch merger",
}


@dataclass(frozen=True)
class TokenCounts:
    """One prompt's tokens: text before the first image, visual tokens, text after them."""

    text_before: int
    visual: int
    text_after: int

    @classmethod
    def from_layout(cls, layout: TokenLayout, row: int = 0) -> TokenCounts:
        """The counts of sequence ``row`` of a batch (text before its first image, visual, the rest)."""
        spans = layout.image_spans(row)
        start = spans[0][0] if spans else layout.visual.shape[1]
        before = int(layout.text[row, :start].sum())
        return cls(before, int(layout.n_visual[row]), int(layout.n_text[row]) - before)

    @classmethod
    def for_images(cls, config: PretrainedConfig, images: int, text_before: int, text_after: int) -> TokenCounts:
        """A prompt with ``images`` images (Idefics3 / SmolVLM: sub-images) of a model whose tower
        :func:`full_flops` counts (:func:`visual_tokens_per_image` tokens each)."""
        return cls(text_before, images * visual_tokens_per_image(config), text_after)

    @classmethod
    def mean(cls, counts: Sequence[TokenCounts]) -> TokenCounts:
        """The mean prompt of several: each count averaged over the prompts and rounded to a whole token.

        FLOPs are counted for this one prompt (the convention every eemllm output uses). Attention
        grows with the square of the length, so this differs a little from summing per-prompt FLOPs:
        on 28 shapes-vqa test prompts (8 to 37 text tokens, 100 visual) the ratio of a 7-layer frozen
        plan is 0.590 for the mean prompt against 0.591 summed.
        """
        if not counts:
            raise ValueError("no prompts to average token counts over; pass at least one")
        mean = [sum(getattr(c, f) for c in counts) / len(counts) for f in ("text_before", "visual", "text_after")]
        return cls(*(round(v) for v in mean))

    @classmethod
    def from_dict(cls, values: Mapping[str, int]) -> TokenCounts:
        """The counts :meth:`to_dict` wrote (extra keys such as ``source`` are ignored)."""
        try:
            return cls(int(values["text_before"]), int(values["visual"]), int(values["text_after"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"token counts need integer text_before, visual and text_after; got {dict(values)}"
                             ) from err

    def to_dict(self) -> dict[str, int]:
        """``{"text_before", "visual", "text_after"}``: JSON for a plan's provenance or a summary."""
        return {"text_before": self.text_before, "visual": self.visual, "text_after": self.text_after}

    @property
    def text(self) -> int:
        return self.text_before + self.text_after

    @property
    def total(self) -> int:
        return self.text + self.visual

    def kept(self, keep: float) -> TokenCounts:
        """The tokens a layer with ``visual_keep`` ``keep`` sees: every text token and ``floor(keep * visual)``
        visual ones (:func:`eemllm_models.withdrawal.kept_counts`, the rule the model applies)."""
        return TokenCounts(self.text_before, int(kept_counts(keep, torch.tensor([self.visual]))[0]), self.text_after)


def layer_tokens(plan: EfficiencyPlan, tokens: TokenCounts) -> list[TokenCounts]:
    """Per decoder layer, the tokens it sees under ``plan``'s ``visual_keep`` (all of ``tokens`` where it keeps 1.0):
    its rows in the prefill and, with the decoded ones, the positions its KV cache holds."""
    return [tokens.kept(keep) for keep in plan.visual_keep]


@dataclass(frozen=True)
class DecoderShape:
    """Sizes of a decoder; the fields after ``layers`` matter only to :func:`full_flops`.

    ``style``: its :class:`DecoderStyle` (None: none covers it; the matrix products of
    :func:`layer_flops` are still counted, :func:`full_flops` refuses it). ``sliding_windows``:
    per layer, the window of a sliding-window layer (its KV cache keeps that many keys while
    decoding) or None. ``rotary_tables``: cos/sin tables built per forward (Gemma 3: one per layer
    type). ``attention_softcap``/``final_softcap``: logit soft-capping of the attention scores / of
    the logits, or None. ``deepstack``: visual features added to the visual hidden states between
    layers (Qwen3-VL), counted as additions of ``visual x hidden``.
    """

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int = 0
    activation: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    style: DecoderStyle | None = DECODER_STYLES[0]
    sliding_windows: tuple[int | None, ...] = ()
    rotary_tables: int = 1
    attention_softcap: float | None = None
    final_softcap: float | None = None
    deepstack: int = 0

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> DecoderShape:
        """The decoder of a multimodal config (its ``text_config``) or of a text config."""
        text = config.get_text_config()
        heads = text.num_attention_heads
        attention_bias = bool(getattr(text, "attention_bias", False))
        windows = _sliding_windows(text)
        vision = getattr(config, "vision_config", None)
        return cls(text.hidden_size, text.intermediate_size, heads, getattr(text, "num_key_value_heads", heads),
                   getattr(text, "head_dim", None) or text.hidden_size // heads, text.num_hidden_layers,
                   vocab=getattr(text, "vocab_size", 0),
                   activation=getattr(text, "hidden_activation", None) or getattr(text, "hidden_act", "silu"),
                   qkv_bias=attention_bias or getattr(text, "model_type", None) in _QKV_BIAS_DECODERS,
                   o_bias=attention_bias, mlp_bias=bool(getattr(text, "mlp_bias", False)),
                   style=decoder_style(config), sliding_windows=windows,
                   rotary_tables=_rotary_tables(text),
                   attention_softcap=getattr(text, "attn_logit_softcapping", None),
                   final_softcap=getattr(text, "final_logit_softcapping", None),
                   deepstack=len(getattr(vision, "deepstack_visual_indexes", None) or ()))

    def decode_keys(self, layer: int, keys: int) -> int:
        """Keys a decoded token of ``layer`` attends to when ``keys`` tokens (itself included) have been
        seen: all of them, or the last ``sliding_window`` in a sliding-window layer (the KV cache
        keeps ``window - 1`` past keys). The prefill attends densely to every key in any layer."""
        window = self.sliding_windows[layer] if layer < len(self.sliding_windows) else None
        return keys if window is None else min(keys, window)


def _rotary_tables(text: PretrainedConfig) -> int:
    """How many cos/sin tables the decoder builds per forward: one per layer type where the rotary
    parameters are given per layer type (Gemma 3: ``{"sliding_attention": ..., "full_attention": ...}``)."""
    rope, types = getattr(text, "rope_parameters", None), set(getattr(text, "layer_types", None) or ())
    return len(types) if isinstance(rope, Mapping) and types and types <= set(rope) else 1


def _sliding_windows(text: PretrainedConfig) -> tuple[int | None, ...]:
    """Per decoder layer, the sliding window its KV cache keeps, or None: transformers' own rule
    (``layer_types``, else ``sliding_window``), which ``generate()``'s ``DynamicCache`` follows."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        types, kwargs = get_layer_types_and_kwargs(text)
        return tuple(k.get("sliding_window") if t == "sliding_attention" else None for t, k in zip(types, kwargs))
    except (ImportError, AttributeError, TypeError):  # older transformers
        window = getattr(text, "sliding_window", None)
        types = getattr(text, "layer_types", None) or [
            "sliding_attention" if window is not None else "full_attention"] * text.num_hidden_layers
        return tuple(window if t == "sliding_attention" else None for t in types)


def layer_flops(shape: DecoderShape, tokens: TokenCounts, mode: str) -> dict[str, float]:
    """Prefill FLOPs of one decoder layer in ``mode`` for one prompt, by matrix-product component
    (:data:`COMPONENTS`): the full count's decoder layer without its element-wise work, except that
    ``naavit``'s own-key scores count as attention."""
    layer = _prefill_layer(shape, tokens, mode)
    return {c: layer[c] + (layer["attention_self"] if c == "attention" else 0) for c in COMPONENTS}


def plan_flops(config: PretrainedConfig, plan: EfficiencyPlan, tokens: TokenCounts) -> pd.DataFrame:
    """Prefill FLOPs per decoder layer and component under ``plan``: columns ``layer, mode, component, flops``.

    A layer after visual tokens were withdrawn or pruned counts the tokens it still sees
    (:func:`layer_tokens`), as FastV's and VTW's own FLOPs formulas do; the ranking before a drop is
    left out of this convention (:func:`full_flops` counts it)."""
    shape = DecoderShape.from_config(config)
    plan.check_layers(shape.layers, "the config")
    rows = [
        {"layer": i, "mode": mode, "component": c, "flops": f}
        for i, (mode, seen) in enumerate(zip(plan.modes, layer_tokens(plan, tokens)))
        for c, f in layer_flops(shape, seen, mode).items()
    ]
    return pd.DataFrame(rows)


def flops_ratio(config: PretrainedConfig, plan: EfficiencyPlan, tokens: TokenCounts) -> float:
    """Decoder prefill FLOPs under ``plan`` divided by those of the original model."""
    planned = plan_flops(config, plan, tokens).flops.sum()
    full = plan_flops(config, EfficiencyPlan.empty(plan.n_layers), tokens).flops.sum()
    return float(planned / full)


CONVENTIONS = {
    "shortv": "decoder prefill, matrix products (attention projections, scores, MLP): ShortV's count, for every "
              "mode and grouped-query attention (flops_ratio)",
    "full": "the whole prefill of generate(): vision tower, projector, decoder with its element-wise work and the "
            "last position's lm_head (full_flops)",
}
"""The named FLOPs conventions: what ``eemllm flops --convention`` prints, what a plan's provenance and the
report label their ratios with (``flops_ratio`` is ``shortv``, ``prefill_flops_ratio`` is ``full``)."""

_UNITS = ((1e15, "PFLOPs"), (1e12, "TFLOPs"), (1e9, "GFLOPs"), (1e6, "MFLOPs"), (1e3, "kFLOPs"))


def flops_unit(flops: float) -> tuple[float, str]:
    """The largest unit (``(1e12, "TFLOPs")``, ``(1e9, "GFLOPs")``, ...) in which ``flops`` is at least 1."""
    for scale, name in _UNITS:
        if abs(flops) >= scale:
            return scale, name
    return 1.0, "FLOPs"


def format_flops(flops: float, digits: int = 1) -> str:
    """``flops`` in the unit that shows it (``"8.5 TFLOPs"``, ``"12.3 MFLOPs"``; never ``"0.0 TFLOPs"``)."""
    scale, name = flops_unit(flops)
    return f"{flops / scale:.{digits}f} {name}"


def flops_provenance(config: PretrainedConfig, plan: EfficiencyPlan, tokens: TokenCounts,
                     source: str | None = None) -> dict:
    """Provenance entries that record ``plan``'s FLOPs under their named :data:`CONVENTIONS` and the
    prompt they were counted for: ``flops_ratio`` with ``flops_convention`` ``"shortv"``,
    ``prefill_flops_ratio`` with ``prefill_flops_convention`` ``"full"`` (when the full count applies),
    and ``tokens`` (``text_before``, ``visual``, ``text_after`` and, when given, their ``source``).
    ``eemllm flops --plan`` reads ``tokens`` back, so it prints these same ratios."""
    figures = flops_figures(config, plan, tokens)
    entries: dict = {"flops_ratio": figures["decoder_flops_ratio"], "flops_convention": "shortv"}
    if "prefill_flops_ratio" in figures:
        entries.update(prefill_flops_ratio=figures["prefill_flops_ratio"], prefill_flops_convention="full")
    entries["tokens"] = {**tokens.to_dict(), **({"source": source} if source else {})}
    return entries


def flops_figures(config: PretrainedConfig, plan: EfficiencyPlan, tokens: TokenCounts) -> dict[str, float]:
    """The FLOPs figures every output shows for ``plan`` on a prompt of ``tokens`` (one place, one number).

    ``decoder_flops_original``/``_pruned``/``decoder_flops_ratio``: the ``shortv`` convention
    (:func:`plan_flops`); ``prefill_flops_original``/``_pruned``/``prefill_flops_ratio``: the ``full``
    convention's prefill (:func:`full_flops`, ``logits_to_keep=1``), left out for towers it cannot
    count; ``text_tokens``, ``visual_tokens``: the prompt counted.
    """
    empty = EfficiencyPlan.empty(plan.n_layers)
    original, pruned = (float(plan_flops(config, p, tokens).flops.sum()) for p in (empty, plan))
    figures = {"decoder_flops_ratio": pruned / original, "decoder_flops_original": original,
               "decoder_flops_pruned": pruned, "text_tokens": tokens.text, "visual_tokens": tokens.visual}
    try:
        full = [float(full_flops(config, p, tokens).flops.sum()) for p in (empty, plan)]
    except (NotImplementedError, ValueError):
        return figures
    figures.update(prefill_flops_ratio=full[1] / full[0], prefill_flops_original=full[0], prefill_flops_pruned=full[1])
    return figures


# The full count.

def _activation_flops(name: str) -> int:
    if name not in ACTIVATION_FLOPS:
        raise ValueError(f"no per-element cost for activation {name!r}; add it to "
                         "analyses.measuring.flops.ACTIVATION_FLOPS "
                         f"(known: {sorted(ACTIVATION_FLOPS)})")
    return ACTIVATION_FLOPS[name]


@dataclass(frozen=True)
class _VisionTower:
    """The sizes of a ViT tower on fixed-size images, and the visual tokens it gives per image."""

    hidden: int
    intermediate: int
    heads: int
    layers: int
    patch: int
    image_size: int
    channels: int
    activation: str
    features: int

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch) ** 2


@dataclass(frozen=True)
class _LlavaVision(_VisionTower):
    """LLaVA-1.5's CLIP tower and two-layer projector (``features``: patches, plus the CLS token with the
    "full" strategy)."""

    projector_in: int
    projector_out: int
    projector_activation: str
    projector_bias: bool

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> _LlavaVision:
        vision = config.vision_config
        if vision.model_type != "clip_vision_model":
            raise NotImplementedError(f"full_flops counts LLaVA's CLIP vision towers, not the tower "
                                      f"{vision.model_type!r}; count the language model with "
                                      "parts=('decoder', 'lm_head')")
        strategy = config.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise ValueError(f"unknown vision_feature_select_strategy {strategy!r}; LLaVA uses 'default' or 'full'")
        feature_layers = config.vision_feature_layer
        stacked = 1 if isinstance(feature_layers, int) else len(feature_layers)
        patches = (vision.image_size // vision.patch_size) ** 2
        return cls(vision.hidden_size, vision.intermediate_size, vision.num_attention_heads, vision.num_hidden_layers,
                   vision.patch_size, vision.image_size, vision.num_channels, vision.hidden_act,
                   patches + (strategy == "full"), vision.hidden_size * stacked, config.get_text_config().hidden_size,
                   config.projector_hidden_act, bool(getattr(config, "multimodal_projector_bias", True)))

    def tower(self, images: int) -> dict[int, dict[str, int]]:
        """FLOPs by tower layer (-1: embeddings and the pre/post norms) and component, for ``images`` images.

        HF LLaVA runs every tower layer and then picks ``vision_feature_layer``'s hidden states, so
        the layers after the feature layer are counted too. The post-norm runs on the CLS row only.
        """
        e, n, d = ELEMENTWISE_FLOPS, self.patches + 1, self.hidden
        embed = {"patch_embed": 2 * self.patches * self.channels * self.patch**2 * d,
                 "position_embed": e["position_embed"] * n * d, "norm": e["layer_norm"] * (n + 1) * d}
        layer = {
            "q_proj": 2 * n * d * d, "kv_proj": 2 * 2 * n * d * d, "o_proj": 2 * n * d * d,
            "attention": 4 * n * n * d, "mlp": 2 * 2 * n * d * self.intermediate,
            "norm": e["layer_norm"] * 2 * n * d, "softmax": e["softmax"] * n * n * self.heads,
            "activation": _activation_flops(self.activation) * n * self.intermediate,
            "residual": e["residual"] * 2 * n * d, "bias": e["bias"] * n * (5 * d + self.intermediate),
        }
        out = {-1: embed, **{i: layer for i in range(self.layers)}}
        return {i: {c: images * f for c, f in counts.items()} for i, counts in out.items()}

    def projector(self, images: int) -> dict[str, int]:
        """FLOPs of ``linear_1 -> activation -> linear_2`` over every image's selected features."""
        rows, out = images * self.features, self.projector_out
        return {"linear_1": 2 * rows * self.projector_in * out, "linear_2": 2 * rows * out * out,
                "activation": _activation_flops(self.projector_activation) * rows * out,
                "bias": ELEMENTWISE_FLOPS["bias"] * 2 * rows * out * self.projector_bias}


@dataclass(frozen=True)
class _SiglipVision(_VisionTower):
    """A SigLIP-style tower on fixed-size images and its projector: Gemma 3 (SigLIP, its features
    average-pooled to ``mm_tokens_per_image``, RMS-normed and projected) and Idefics3 / SmolVLM (one
    tower pass per sub-image, ``scale_factor^2`` patches pixel-shuffled into one token and projected).
    Unlike CLIP: no class token, no pre-norm, a bias on the patch convolution, the post-norm on every
    patch row, and SigLIP's attention-pooling ``head`` where ``vision_use_head`` is set (its output
    is unused, but it runs). ``features``: visual tokens per image (Gemma 3) or sub-image (Idefics3 / SmolVLM)."""

    head: bool
    pooled: bool  # Gemma 3: average pooling and an RMS norm before the projection
    projector_in: int
    projector_out: int

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> _SiglipVision:
        vision, text_hidden = config.vision_config, config.get_text_config().hidden_size
        patches = (vision.image_size // vision.patch_size) ** 2
        pooled = config.model_type == "gemma3"
        if pooled:
            features, projector_in = config.mm_tokens_per_image, vision.hidden_size
        else:
            features, projector_in = patches // config.scale_factor**2, vision.hidden_size * config.scale_factor**2
        return cls(vision.hidden_size, vision.intermediate_size, vision.num_attention_heads, vision.num_hidden_layers,
                   vision.patch_size, vision.image_size, vision.num_channels, vision.hidden_act, features,
                   bool(getattr(vision, "vision_use_head", False)), pooled, projector_in, text_hidden)

    def tower(self, images: int) -> dict[int, dict[str, int]]:
        """FLOPs by tower layer (-1: patch and position embeddings, post-norm, head) and component."""
        e, n, d, m = ELEMENTWISE_FLOPS, self.patches, self.hidden, self.intermediate
        act = _activation_flops(self.activation)
        embed = {"patch_embed": 2 * n * self.channels * self.patch**2 * d,
                 "position_embed": e["position_embed"] * n * d, "norm": e["layer_norm"] * n * d,
                 "bias": e["bias"] * n * d}
        if self.head:  # one probe query attends to every patch, then a norm and an MLP on its row
            head = {"head": 2 * d * d + 2 * 2 * n * d * d + 4 * n * d + 2 * d * d + 2 * 2 * d * m,
                    "softmax": e["softmax"] * n * self.heads, "norm": e["layer_norm"] * d,
                    "activation": act * m, "residual": e["residual"] * d,
                    "bias": e["bias"] * (d + 2 * n * d + d + m + d)}
            embed = {c: embed.get(c, 0) + head.get(c, 0) for c in {*embed, *head}}
        layer = {
            "q_proj": 2 * n * d * d, "kv_proj": 2 * 2 * n * d * d, "o_proj": 2 * n * d * d,
            "attention": 4 * n * n * d, "mlp": 2 * 2 * n * d * m,
            "norm": e["layer_norm"] * 2 * n * d, "softmax": e["softmax"] * n * n * self.heads,
            "activation": act * n * m, "residual": e["residual"] * 2 * n * d, "bias": e["bias"] * n * (5 * d + m),
        }
        out = {-1: embed, **{i: layer for i in range(self.layers)}}
        return {i: {c: images * f for c, f in counts.items()} for i, counts in out.items()}

    def projector(self, images: int) -> dict[str, int]:
        """FLOPs of the projection of every image's features (after Gemma 3's pooling and norm)."""
        e, rows = ELEMENTWISE_FLOPS, images * self.features
        counts = {"projection": 2 * rows * self.projector_in * self.projector_out}
        if self.pooled:
            counts.update(pool=e["pool"] * images * self.patches * self.hidden,
                          norm=e["rms_norm"] * rows * self.hidden)
        return counts


_COUNTED_TOWERS = {"llava": _LlavaVision, "gemma3": _SiglipVision, "idefics3": _SiglipVision,
                   "smolvlm": _SiglipVision}
"""The multimodal model types whose tower and projector :func:`full_flops` counts."""


def _vision_of(config: PretrainedConfig) -> _LlavaVision | _SiglipVision:
    """The counted tower and projector of a multimodal config, or ``NotImplementedError`` naming the tower."""
    model_type = getattr(config, "model_type", None)
    vision = getattr(config, "vision_config", None)
    if vision is None:
        raise ValueError(f"the config (model type {model_type!r}) has no vision tower; "
                         "count the language model only with parts=('decoder', 'lm_head')")
    if model_type not in _COUNTED_TOWERS:
        what = _UNSUPPORTED_VISION.get(model_type, "its vision tower and projector")
        raise NotImplementedError(
            f"full_flops does not count the vision tower {getattr(vision, 'model_type', type(vision).__name__)!r} "
            f"of model type {model_type!r} ({what}); it counts the towers and projectors of "
            f"{', '.join(repr(t) for t in _COUNTED_TOWERS)}. Count the language model with "
            "parts=('decoder', 'lm_head') and TokenCounts of its visual tokens")
    return _COUNTED_TOWERS[model_type].from_config(config)


def visual_tokens_per_image(config: PretrainedConfig) -> int:
    """Visual tokens one image becomes: LLaVA-1.5 ``(image_size / patch_size)^2`` (+1 with the ``full``
    feature strategy), every image resized to the tower's ``image_size``; Gemma 3
    ``mm_tokens_per_image``; Idefics3 / SmolVLM: per *sub-image* (their processors split an image
    into several sub-images and a global one), ``(image_size / patch_size)^2 / scale_factor^2``."""
    return _vision_of(config).features


def _decoder_layer(shape: DecoderShape, kv_rows: int, query_rows: int, output_rows: int, scored: int,
                   self_scored: int) -> dict[str, int]:
    """FLOPs of one decoder layer that projects keys/values of ``kv_rows`` rows, queries of ``query_rows``,
    scores ``scored`` (query, key) pairs by matrix products and ``self_scored`` element-wise, and runs
    o_proj and the MLP on ``output_rows`` rows. The matrix products are the same in every style;
    the style adds per-head q/k norms and Gemma 3's extra norms of the output rows."""
    e, h, m, style = ELEMENTWISE_FLOPS, shape.hidden, shape.intermediate, shape.style or DECODER_STYLES[0]
    q_width, kv_width = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    output_norms = 3 if style.sandwich_norms else 1  # post-attention (+ pre- and post-feed-forward)
    return {
        "q_proj": 2 * query_rows * h * q_width,
        "kv_proj": 2 * 2 * kv_rows * h * kv_width,
        "o_proj": 2 * output_rows * q_width * h,
        "attention": 4 * scored * q_width,
        "mlp": 2 * 3 * output_rows * h * m,
        "attention_self": 4 * self_scored * q_width,
        "norm": e["rms_norm"] * (kv_rows + output_norms * output_rows) * h,
        "qk_norm": e["rms_norm"] * (query_rows * q_width + kv_rows * kv_width) * style.head_norms,
        "rotary": e["rotary"] * (query_rows * q_width + kv_rows * kv_width),
        "softmax": e["softmax"] * (scored + self_scored) * shape.heads,
        "softcap": e["softcap"] * (scored + self_scored) * shape.heads * (shape.attention_softcap is not None),
        "activation": (_activation_flops(shape.activation) + e["gate"]) * output_rows * m,
        "residual": e["residual"] * 2 * output_rows * h,
        "bias": e["bias"] * (shape.qkv_bias * (query_rows * q_width + 2 * kv_rows * kv_width)
                             + shape.o_bias * output_rows * h + shape.mlp_bias * output_rows * (2 * m + h)),
    }


def _prefill_layer(shape: DecoderShape, tokens: TokenCounts, mode: str) -> dict[str, int]:
    """What the fast path of ``mode`` (``eemllm_models.modes.fast_forward``) computes for one prompt."""
    n, t, v = tokens.total, tokens.text, tokens.visual
    scored = {"full": n * n, "naavit": t * n + v * t, "frozen": t * n, "composite": t * n}[mode]
    return _decoder_layer(shape, kv_rows=n, query_rows=n if mode in ("full", "naavit") else t,
                          output_rows=t if mode == "frozen" else n, scored=scored,
                          self_scored=v if mode == "naavit" else 0)


def _ranking(shape: DecoderShape, rows: int) -> dict[str, int]:
    """FLOPs of FastV's ranking at a layer of ``rows`` input rows (``eemllm_models.withdrawal.last_query_attention``):
    the input norm of every row, the last position's query, every row's key (no values), rotary (and
    q/k norms), one row of scores over the ``rows`` keys per head and its softmax."""
    e, style = ELEMENTWISE_FLOPS, shape.style or DECODER_STYLES[0]
    q_width, kv_width = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    return {"norm": e["rms_norm"] * rows * shape.hidden, "q_proj": 2 * shape.hidden * q_width,
            "kv_proj": 2 * rows * shape.hidden * kv_width, "attention": 2 * rows * q_width,
            "rotary": e["rotary"] * (q_width + rows * kv_width),
            "qk_norm": e["rms_norm"] * (q_width + rows * kv_width) * style.head_norms,
            "softmax": e["softmax"] * rows * shape.heads,
            "bias": e["bias"] * shape.qkv_bias * (q_width + rows * kv_width)}


def _parts_of(config: PretrainedConfig) -> tuple[str, ...]:
    return PARTS if getattr(config, "vision_config", None) is not None else ("decoder", "lm_head")


def countable_parts(config: PretrainedConfig) -> tuple[str, ...]:
    """The :data:`PARTS` of ``config`` that :func:`full_flops` counts: the vision tower and projector
    where it counts that tower (LLaVA-1.5's CLIP), the decoder where a :class:`DecoderStyle` covers
    it, and lm_head."""
    parts = []
    if getattr(config, "vision_config", None) is not None:
        try:
            _vision_of(config)
            parts += ["vision_tower", "projector"]
        except NotImplementedError:
            pass
    return (*parts, *(["decoder"] if decoder_style(config) is not None else []), "lm_head")


def full_flops(config: PretrainedConfig, plan: EfficiencyPlan, tokens: TokenCounts, decode_tokens: int = 0,
               logits_to_keep: int = 1, parts: Sequence[str] | None = None) -> pd.DataFrame:
    """Every FLOP a ``generate()`` computes for one prompt under ``plan`` (fast implementation).

    ``tokens``: the prompt (its visual tokens set the number of images). ``decode_tokens``: decoding
    forwards of one token each after the prefill (``generate(max_new_tokens=k)`` runs ``k - 1``: the
    prefill yields the first token); decode step ``s`` attends to ``tokens.total + s`` keys (the
    last ``sliding_window`` in a sliding-window layer), every layer ``full``. Under a plan whose
    ``visual_keep`` drops, each layer counts the tokens it still sees (:func:`layer_tokens`) in the
    prefill, and its decode steps attend over its shorter KV cache (``seen.total + s`` keys); the layer
    before each drop that ranks by ``attention`` also counts the ranking (the last position's query,
    every row's key, one row of scores: added to its ``q_proj``, ``kv_proj``, ``attention``, norm,
    rotary and softmax counts, since it runs inside that layer and its projections). ``logits_to_keep``:
    positions whose prefill logits are computed (1 in ``generate()``, 0 for all, as in a plain
    forward). ``parts``: a subset of :data:`PARTS` (default: all the config has; a tower it does
    not count raises ``NotImplementedError``, so pass ``("decoder", "lm_head")``, or
    :func:`countable_parts`, for it). A decoder no :data:`DECODER_STYLES` entry covers raises
    ``NotImplementedError`` too.

    Returns a frame with one row per nonzero count: ``phase`` (``prefill``/``decode``), ``step``
    (0 for the prefill, 1.. per decoded token), ``part`` (:data:`PARTS`), ``layer`` (index within
    its part; -1 for work outside layers: embeddings, final norm, rotary table), ``mode`` (what the
    decoder layer ran; ``full`` elsewhere), ``component`` (see the module docstring), ``flops``.
    """
    shape = DecoderShape.from_config(config)
    plan.check_layers(shape.layers, "the config")
    parts = _parts_of(config) if parts is None else tuple(parts)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown part(s) {unknown}; choose from {list(PARTS)}")
    if decode_tokens < 0 or logits_to_keep < 0:
        raise ValueError(f"decode_tokens and logits_to_keep must be >= 0, got {decode_tokens} and {logits_to_keep}")
    if "decoder" in parts and shape.style is None:
        known = ", ".join(f"{s.name} ({', '.join(s.model_types)})" for s in DECODER_STYLES)
        raise NotImplementedError(f"full_flops counts the decoder styles {known}, not the decoder of text model "
                                  f"type {config.get_text_config().model_type!r}; add it to "
                                  "analyses.measuring.flops.DECODER_STYLES if one of them describes it")
    rows: list[tuple] = []

    def add(phase: str, step: int, part: str, layer: int, mode: str, counts: Mapping[str, int]) -> None:
        rows.extend((phase, step, part, layer, mode, c, int(f)) for c, f in counts.items() if f)

    if {"vision_tower", "projector"} & set(parts):
        vision = _vision_of(config)
        images, extra = divmod(tokens.visual, vision.features)
        if extra:
            raise ValueError(f"{tokens.visual} visual tokens are not a whole number of images of "
                             f"{vision.features} tokens each; check the TokenCounts or the config")
        if "vision_tower" in parts:
            for layer, counts in vision.tower(images).items():
                add("prefill", 0, "vision_tower", layer, "full", counts)
        if "projector" in parts:
            add("prefill", 0, "projector", -1, "full", vision.projector(images))
    n, e = tokens.total, ELEMENTWISE_FLOPS
    seen = layer_tokens(plan, tokens)
    ranked = {layer - 1 for layer, keep in plan.keep_stages() if plan.visual_ranking == "attention" and keep > 0}
    for step in range(decode_tokens + 1):
        phase, new = ("prefill", n) if step == 0 else ("decode", 1)
        if "decoder" in parts:
            for layer, mode in enumerate(plan.modes):
                if step == 0:
                    counts = _prefill_layer(shape, seen[layer], mode)
                    if layer in ranked:
                        counts = {c: f + _ranking(shape, seen[layer].total).get(c, 0) for c, f in counts.items()}
                    add(phase, step, "decoder", layer, mode, counts)
                else:
                    keys = shape.decode_keys(layer, seen[layer].total + step)
                    add(phase, step, "decoder", layer, "full", _decoder_layer(shape, 1, 1, 1, keys, 0))
            add(phase, step, "decoder", -1, "full", {
                "rotary": e["rotary_table"] * shape.rotary_tables * new * shape.head_dim,
                "norm": e["rms_norm"] * new * shape.hidden,
                "scale": e["scale"] * new * shape.hidden * shape.style.scaled_embeddings,
                "residual": e["residual"] * shape.deepstack * tokens.visual * shape.hidden * (step == 0)})
        if "lm_head" in parts:
            kept = new if step or logits_to_keep == 0 else min(logits_to_keep, n)
            add(phase, step, "lm_head", -1, "full", {
                "lm_head": 2 * kept * shape.hidden * shape.vocab,
                "softcap": e["softcap"] * kept * shape.vocab * (shape.final_softcap is not None)})
    return pd.DataFrame(rows, columns=["phase", "step", "part", "layer", "mode", "component", "flops"])


def matmul_flops(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of a :func:`full_flops` frame that are matrix products (:data:`MATMUL_COMPONENTS`):
    what ``FlopCounterMode`` counts, so the two compare like for like."""
    return frame[frame.component.isin(MATMUL_COMPONENTS)].reset_index(drop=True)


# Cross-check against torch's FlopCounterMode.

def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts CPU ``sdpa`` (torch 2.13 has no formula for
    ``aten._scaled_dot_product_flash_attention_for_cpu`` and would count its attention as 0)."""
    return FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops})


def _part_paths(model: PreTrainedModel) -> dict[str, str]:
    """Where each of :data:`PARTS` lives in ``model``: the decoder at the family's language model
    (``model.language_model``, ``model.text_model`` for Idefics3/SmolVLM), the tower at
    ``model.vision_tower`` (``model.vision_model`` for Idefics3/SmolVLM) and the projector at
    ``model.multi_modal_projector`` (``model.connector``)."""
    from eemllm_models.families import family_of

    def first(*names: str) -> str:
        return next((f"model.{n}" for n in names if _has_path(model, f"model.{n}")), f"model.{names[0]}")

    return {"vision_tower": first("vision_tower", "vision_model"), "projector": first("multi_modal_projector",
                                                                                      "connector"),
            "decoder": f"model.{family_of(model).language_model}", "lm_head": "lm_head"}


_LAYER = re.compile(r"^(?:.*\.)?layers\.(\d+)$")
_LAYER_CHILD = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(self_attn\.(?:q|k|v|o|out)_proj|mlp)$")
_CHILD_COMPONENT = {"self_attn.q_proj": "q_proj", "self_attn.k_proj": "kv_proj", "self_attn.v_proj": "kv_proj",
                    "self_attn.o_proj": "o_proj", "self_attn.out_proj": "o_proj", "mlp": "mlp"}
_REST_COMPONENT = {"vision_tower": "patch_embed", "projector": "projection", "decoder": "other", "lm_head": "lm_head"}
_TOP_COMPONENTS = {"vision_tower": ("head",), "projector": ("linear_1", "linear_2")}
"""Submodules of a part outside its layers counted as their own component (the rest is ``_REST_COMPONENT``)."""


def _module_names(model: PreTrainedModel, path: str) -> list[str]:
    """The names ``FlopCounterMode`` may give the submodule at ``path``: under each ancestor it was
    called from (``LlavaForConditionalGeneration.model.vision_tower``, ..., ``CLIPVisionModel``)."""
    names, module, segments = [], model, path.split(".")
    for i in range(len(segments) + 1):
        names.append(".".join([type(module).__name__, *segments[i:]]))
        if i < len(segments):
            module = getattr(module, segments[i])
    return names


def counted_flops(counter: FlopCounterMode, model: PreTrainedModel,
                  parts: Sequence[str] | None = None) -> pd.DataFrame:
    """What ``counter`` counted in ``model``'s ``parts`` (default: all of :data:`PARTS` it has), on the
    footing of :func:`matmul_flops`.

    Columns ``part, layer, component, flops``. Per layer, ``q_proj``/``kv_proj``/``o_proj``/``mlp``
    are the counts of those submodules and ``attention`` the rest of the layer (the fast paths
    compute attention in the layer itself); outside layers: ``patch_embed`` (tower), ``linear_1``,
    ``linear_2`` (projector), ``lm_head``, and ``other`` for anything else counted.
    """
    totals: dict[str, dict[str, int]] = {part: defaultdict(int) for part in PARTS}
    prefixes = [(name, part) for part, path in _part_paths(model).items()
                if (parts is None or part in parts) and _has_path(model, path)
                for name in _module_names(model, path)]
    for key, ops in counter.get_flop_counts().items():
        for name, part in prefixes:
            if key == name or key.startswith(name + "."):
                totals[part][key[len(name) + 1:]] += sum(ops.values())
                break
    rows = []
    for part, by_name in totals.items():
        if not by_name:
            continue
        layers: dict[int, int] = defaultdict(int)
        children: dict[tuple[int, str], int] = defaultdict(int)
        for name, flops in by_name.items():
            if layer := _LAYER.match(name):
                layers[int(layer[1])] += flops
            elif child := _LAYER_CHILD.match(name):
                children[int(child[1]), _CHILD_COMPONENT[child[2]]] += flops
        top = {c: by_name.get(c, 0) for c in _TOP_COMPONENTS.get(part, ())}
        top[_REST_COMPONENT[part]] = by_name.get("", 0) - sum(layers.values()) - sum(top.values())
        rows += [(part, -1, c, f) for c, f in top.items()]
        for layer, total in sorted(layers.items()):
            parts_of_layer = {c: f for (i, c), f in children.items() if i == layer}
            parts_of_layer["attention"] = total - sum(parts_of_layer.values())
            rows += [(part, layer, c, f) for c, f in parts_of_layer.items()]
    frame = pd.DataFrame(rows, columns=["part", "layer", "component", "flops"])
    return frame[frame.flops != 0].reset_index(drop=True)


def _has_path(model: torch.nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def cross_check(model: PreTrainedModel, plan: EfficiencyPlan, batch: Mapping[str, torch.Tensor],
                max_new_tokens: int = 2, parts: Sequence[str] | None = None) -> pd.DataFrame:
    """Count ``model.generate(**batch, max_new_tokens=...)`` under ``plan`` (fast implementation) with
    :func:`flop_counter` and set it beside the analytic :func:`matmul_flops` of :func:`full_flops`.

    ``batch``: one prompt without padding (``input_ids`` ``[1, seq]``, ``pixel_values``, ...).
    ``parts``: the :data:`PARTS` compared (default: all the config has, as :func:`full_flops`;
    :func:`countable_parts` for a family whose tower is not counted).
    Returns columns ``part, layer, component, analytic, counted, ratio`` (counted / analytic),
    prefill and decode summed. Attention must be ``eager`` or ``sdpa`` (on CPU or GPU).
    """
    parts = _parts_of(model.config) if parts is None else tuple(parts)
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if input_ids.shape[0] != 1 or (mask is not None and not bool(mask.all())):
        raise ValueError(f"cross_check counts one prompt without padding; got input_ids of shape "
                         f"{tuple(input_ids.shape)}{'' if mask is None else ' with padding'}")
    tokens = TokenCounts.from_layout(token_layout(model, input_ids))
    with plan.applied(model), torch.no_grad(), flop_counter() as counter:
        out = model.generate(**batch, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             do_sample=False)
    decoded = out.shape[1] - input_ids.shape[1]
    analytic = matmul_flops(full_flops(model.config, plan, tokens, decode_tokens=decoded - 1, parts=parts))
    keys = ["part", "layer", "component"]
    counted = counted_flops(counter, model, parts).rename(columns={"flops": "counted"})
    merged = (analytic.groupby(keys, as_index=False).flops.sum().rename(columns={"flops": "analytic"})
              .merge(counted, on=keys, how="outer")
              .fillna({"analytic": 0, "counted": 0}))
    merged["ratio"] = merged.counted / merged.analytic
    return merged


MODEL_CONFIGS = Path(__file__).resolve().parent / "model_configs"
"""Shipped configs of the models the ShortV paper reports (public sizes, no weights)."""
PAPER_VISUAL_TOKENS = {"llava": 576, "llava_next": 2880}
"""Visual tokens per image in the ShortV paper's FLOPs counts, by model type."""


def shortv_convention_flops(config: PretrainedConfig, plan: EfficiencyPlan, text_tokens: int = 64,
                            visual_tokens: int | None = None) -> float:
    """Prefill FLOPs under ``plan`` in the ShortV paper's convention (attention and MLP only).

    Per ``full`` layer ``2(t+v)(4h+3m)h + 4(t+v)^2 h``; per ``frozen`` layer
    ``2t(4h+3m)h + 4vh^2 + 4t(t+v)h`` (``t`` text tokens, ``v`` visual, ``h`` hidden size, ``m`` MLP
    size). ``visual_tokens`` defaults to the paper's 576 (LLaVA-1.5) or 2880 (LLaVA-NeXT). The
    convention has no other modes; a plan with ``naavit`` or ``composite`` layers is refused. A plan
    that withdraws or prunes visual tokens counts each layer's remaining ``v`` (:func:`layer_tokens`),
    as FastV's per-layer count does.
    """
    shape = DecoderShape.from_config(config)
    plan.check_layers(shape.layers, "the config")
    other = sorted(set(plan.modes) - {"full", "frozen"})
    if other:
        raise ValueError(f"the ShortV convention counts only full and frozen layers, not {other}; "
                         "use plan_flops for other modes")
    if visual_tokens is None:
        model_type = getattr(config, "model_type", None)
        if model_type not in PAPER_VISUAL_TOKENS:
            raise ValueError(f"no paper visual-token count for model type {model_type!r}; pass visual_tokens")
        visual_tokens = PAPER_VISUAL_TOKENS[model_type]
    t, h, m = text_tokens, shape.hidden, shape.intermediate
    total = 0
    for mode, seen in zip(plan.modes, layer_tokens(plan, TokenCounts(0, visual_tokens, text_tokens))):
        v = seen.visual
        if mode == "frozen":
            total += 2 * t * (4 * h + 3 * m) * h + 4 * v * h**2 + 4 * t * (t + v) * h
        else:
            total += 2 * (t + v) * (4 * h + 3 * m) * h + 4 * (t + v) ** 2 * h
    return float(total)


def load_config(name_or_path: str) -> PretrainedConfig:
    """A shipped paper model config (``llava-1.5-7b``, ``llava-next-13b``, ...), ``default`` (the embedded
    model's), or any config by path or hub id."""
    from eemllm_models.zoo import resolve

    name_or_path = resolve(name_or_path)
    shipped = MODEL_CONFIGS / f"{name_or_path}.json"
    if shipped.is_file():
        return AutoConfig.from_pretrained(shipped)
    from eemllm_models.loading import hub_unreachable

    cache_only = {"local_files_only": True} if hub_unreachable(name_or_path) else {}  # fail in seconds offline
    try:
        return AutoConfig.from_pretrained(name_or_path, **cache_only)
    except OSError as err:
        known = ", ".join(sorted(p.stem for p in MODEL_CONFIGS.glob("*.json")))
        raise ValueError(f"no model config {name_or_path!r}: not one of the shipped ones ({known}), "
                         f"and not a readable local directory or cached hub id ({err})") from err
