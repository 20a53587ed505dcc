"""Decoder-layer styles: each supported layer is recognised, and a layer no style describes is refused
naming what was not recognised (never the Llama recipe on a non-Llama layer)."""

import pytest
import torch
from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

from eemllm_models import EfficiencyPlan, apply_plan
from eemllm_models.anatomy import style_of
from eemllm_models.families import family_of
from tiny_models import FAMILIES, TEXT

STYLE_OF_FAMILY = {"qwen3_vl": "qwen3", "internvl_qwen3": "qwen3", "gemma3": "gemma3"}
"""The decoder style of each tiny family (``llama`` where not listed)."""


@pytest.mark.parametrize("family", FAMILIES)
def test_every_supported_family_has_a_style(family):
    model = FAMILIES[family][0](seed=0)
    styles = {style_of(layer).name for layer in family_of(model).decoder_layers(model)}
    assert styles == {STYLE_OF_FAMILY.get(family, "llama")}


def test_the_qwen3_style_forms_queries_and_keys_as_the_model_does():
    model = FAMILIES["qwen3_vl"][0](seed=1)
    attn = model.model.language_model.layers[0].self_attn
    normed = torch.randn(2, 5, TEXT["hidden_size"])
    style = style_of(model.model.language_model.layers[0])
    expected = attn.q_norm(attn.q_proj(normed).view(2, 5, -1, attn.head_dim))
    torch.testing.assert_close(style.queries(attn, normed), expected, rtol=0, atol=0)
    assert not torch.allclose(expected, attn.q_proj(normed).view(2, 5, -1, attn.head_dim))


def test_a_layer_with_parts_no_style_has_is_refused_before_anything_changes():
    model = FAMILIES["llava"][0](seed=0)
    layer = model.model.language_model.layers[2]
    layer.pre_feedforward_layernorm = torch.nn.LayerNorm(TEXT["hidden_size"])  # a Gemma-style sandwich norm
    forward = layer.forward
    refused = r"LlamaDecoderLayer: unrecognised parts \['pre_feedforward_layernorm'\].*Add a LayerStyle"
    with pytest.raises(NotImplementedError, match=refused):
        apply_plan(model, EfficiencyPlan.from_layers(4, [2], "frozen"))
    assert layer.forward == forward and getattr(model, "_eemllm_applied", None) is None
    apply_plan(model, EfficiencyPlan.from_layers(4, [1], "frozen")).remove()  # the plain layers are fine


def test_families_without_a_checked_recipe_are_refused_with_the_reason():
    text = {**TEXT, "head_dim": 16, "num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 32,
            "rope_scaling": {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True}}
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=16, deepstack_visual_indexes=[0])
    model = Qwen3VLMoeForConditionalGeneration(Qwen3VLMoeConfig(text_config=text, vision_config=vision))
    with pytest.raises(ValueError, match="qwen3_vl_moe.*mixture-of-experts feed-forward is not checked"):
        apply_plan(model, EfficiencyPlan.from_layers(4, [1], "frozen"))
