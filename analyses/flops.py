"""Analytic prefill FLOPs of decoder layers per mode, from the model config and the token counts.

Counting convention (multiply-adds count 2): projections and MLP are ``2 * rows * in * out``;
attention scores and the weighted sum of values are ``4 * queries * keys * heads * head_dim``
with every key of the sequence counted for every query, causal or not (ShortV's convention).
Norms, rotary embeddings, softmax, the vision tower and lm_head are not counted here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from transformers import AutoConfig, PretrainedConfig

from eemllm_models import EfficiencyPlan, TokenLayout

COMPONENTS = ("q_proj", "kv_proj", "o_proj", "attention", "mlp")


@dataclass(frozen=True)
class TokenCounts:
    """One prompt's tokens: text before the first image, visual tokens, text after them."""

    text_before: int
    visual: int
    text_after: int

    @classmethod
    def from_layout(cls, layout: TokenLayout, row: int = 0) -> TokenCounts:
        """The counts of sequence ``row`` of a batch (text before its first image, visual, the rest)."""
        start, _ = layout.image_spans(row)[0]
        before = int(layout.text[row, :start].sum())
        return cls(before, int(layout.n_visual[row]), int(layout.n_text[row]) - before)

    @property
    def text(self) -> int:
        return self.text_before + self.text_after

    @property
    def total(self) -> int:
        return self.text + self.visual


@dataclass(frozen=True)
class DecoderShape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> DecoderShape:
        """The decoder of a multimodal config (its ``text_config``) or of a text config."""
        text = config.get_text_config()
        heads = text.num_attention_heads
        return cls(text.hidden_size, text.intermediate_size, heads, getattr(text, "num_key_value_heads", heads),
                   getattr(text, "head_dim", None) or text.hidden_size // heads, text.num_hidden_layers)


def layer_flops(shape: DecoderShape, tokens: TokenCounts, mode: str) -> dict[str, float]:
    """Prefill FLOPs of one decoder layer in ``mode`` for one prompt, by component."""
    n, t, v = tokens.total, tokens.text, tokens.visual
    q_width, kv_width = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    query_rows = {"full": n, "naavit": n, "frozen": t, "composite": t}[mode]
    output_rows = {"full": n, "naavit": n, "frozen": t, "composite": n}[mode]
    if mode == "full":
        scored = n * n
    elif mode == "naavit":
        scored = t * n + v * (tokens.text_before + 1)
    else:
        scored = t * n
    return {
        "q_proj": 2 * query_rows * shape.hidden * q_width,
        "kv_proj": 2 * 2 * n * shape.hidden * kv_width,
        "o_proj": 2 * output_rows * q_width * shape.hidden,
        "attention": 4 * scored * q_width,
        "mlp": 2 * 3 * output_rows * shape.hidden * shape.intermediate,
    }


def plan_flops(config: PretrainedConfig, plan: EfficiencyPlan, tokens: TokenCounts) -> pd.DataFrame:
    """Prefill FLOPs per decoder layer and component under ``plan``: columns ``layer, mode, component, flops``."""
    shape = DecoderShape.from_config(config)
    plan.check_layers(shape.layers, "the config")
    rows = [
        {"layer": i, "mode": mode, "component": c, "flops": f}
        for i, mode in enumerate(plan.modes)
        for c, f in layer_flops(shape, tokens, mode).items()
    ]
    return pd.DataFrame(rows)


def flops_ratio(config: PretrainedConfig, plan: EfficiencyPlan, tokens: TokenCounts) -> float:
    """Decoder prefill FLOPs under ``plan`` divided by those of the original model."""
    planned = plan_flops(config, plan, tokens).flops.sum()
    full = plan_flops(config, EfficiencyPlan.empty(plan.n_layers), tokens).flops.sum()
    return float(planned / full)


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
    convention has no other modes; a plan with ``naavit`` or ``composite`` layers is refused.
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
    t, v, h, m = text_tokens, visual_tokens, shape.hidden, shape.intermediate
    dense = 2 * (t + v) * (4 * h + 3 * m) * h + 4 * (t + v) ** 2 * h
    frozen = 2 * t * (4 * h + 3 * m) * h + 4 * v * h**2 + 4 * t * (t + v) * h
    return float(sum(frozen if mode == "frozen" else dense for mode in plan.modes))


def load_config(name_or_path: str) -> PretrainedConfig:
    """A shipped paper model config (``llava-1.5-7b``, ``llava-next-13b``, ...) or any config by path or hub id."""
    shipped = MODEL_CONFIGS / f"{name_or_path}.json"
    if shipped.is_file():
        return AutoConfig.from_pretrained(shipped)
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except OSError as err:
        known = ", ".join(sorted(p.stem for p in MODEL_CONFIGS.glob("*.json")))
        raise ValueError(f"no model config {name_or_path!r}: not one of the shipped ones ({known}), "
                         f"and not a readable local directory or cached hub id ({err})") from err
