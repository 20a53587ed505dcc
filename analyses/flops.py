"""Analytic prefill FLOPs of decoder layers per mode, from the model config and the token counts.

Counting convention (multiply-adds count 2): projections and MLP are ``2 * rows * in * out``;
attention scores and the weighted sum of values are ``4 * queries * keys * heads * head_dim``
with every key of the sequence counted for every query, causal or not (ShortV's convention).
Norms, rotary embeddings, softmax, the vision tower and lm_head are not counted here.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from transformers import PretrainedConfig

from eemllm_models import EfficiencyPlan

COMPONENTS = ("q_proj", "kv_proj", "o_proj", "attention", "mlp")


@dataclass(frozen=True)
class TokenCounts:
    """One prompt's tokens: text before the first image, visual tokens, text after them."""

    text_before: int
    visual: int
    text_after: int

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
