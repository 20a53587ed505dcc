"""Decoder-layer styles: each supported layer is recognised, and a layer no style describes is refused
naming what was not recognised (never the Llama recipe on a non-Llama layer)."""

import pytest
import torch
from tiny_models import FAMILIES, TEXT
from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration
from transformers.models.llama.modeling_llama import repeat_kv

from eemllm_models import EfficiencyPlan, apply_plan
from eemllm_models.anatomy import STYLES, recognise_style, style_of
from eemllm_models.families import family_of
from eemllm_models.modes import allowed_keys, rotate

STYLE_OF_FAMILY = {"qwen3_vl": "qwen3", "internvl_qwen3": "qwen3", "gemma3": "gemma3"}
"""The decoder style of each tiny family (``llama`` where not listed)."""


@pytest.mark.parametrize("family", FAMILIES)
def test_every_supported_family_has_a_style(family):
    model = FAMILIES[family][0](seed=0)
    styles = {style_of(layer).name for layer in family_of(model).decoder_layers(model)}
    assert styles == {STYLE_OF_FAMILY.get(family, "llama")}


def _captured_layer_calls(model, batch) -> list[tuple[torch.nn.Module, torch.Tensor, dict, torch.Tensor]]:
    """Every decoder layer's input hidden states, keyword arguments and output in one forward of ``batch``."""
    calls = []

    def keep(layer, args, kwargs, output):
        calls.append((layer, args[0], dict(kwargs), output[0] if isinstance(output, tuple) else output))

    layers = family_of(model).decoder_layers(model)
    hooks = [layer.register_forward_hook(keep, with_kwargs=True) for layer in layers]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for hook in hooks:
            hook.remove()
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_the_style_steps_rebuild_every_layer_of_the_family(family):
    """A layer recomposed from its style's steps (queries, keys, values, plain attention under the model's
    mask, attention residual, feed-forward) gives the layer's own output: the style describes it whole."""
    build_model, build_batch = FAMILIES[family]
    model = build_model(seed=3, attn="eager")
    for layer, hidden, kwargs, expected in _captured_layer_calls(model, build_batch(model, 2, 2, seed=3)):
        attn, style = layer.self_attn, style_of(layer)
        batch, seq, _ = hidden.shape
        cos, sin = (t.expand(batch, -1, -1) for t in kwargs["position_embeddings"])
        normed = layer.input_layernorm(hidden)
        query = rotate(style.queries(attn, normed).transpose(1, 2), cos, sin)
        key = repeat_kv(rotate(style.keys(attn, normed).transpose(1, 2), cos, sin), attn.num_key_value_groups)
        value = repeat_kv(style.values(attn, normed).transpose(1, 2), attn.num_key_value_groups)
        allowed = allowed_keys(kwargs.get("attention_mask"), batch, seq, seq, hidden.device)
        scores = (query @ key.transpose(2, 3) * attn.scaling).masked_fill(~allowed, torch.finfo(query.dtype).min)
        heads = (torch.softmax(scores, dim=-1) @ value).transpose(1, 2).flatten(2)
        rebuilt = style.feed_forward(layer, style.attention_residual(layer, hidden, heads))
        torch.testing.assert_close(rebuilt, expected, rtol=1e-5, atol=1e-5)


def test_the_gemma3_layers_differ_from_the_llama_recipe_where_the_style_says():
    """Gemma 3's sliding-window layers get a banded mask, its image tokens attend to each other both ways,
    and its sandwich norms change the output: the llama steps on the same layer give another result."""
    build_model, build_batch = FAMILIES["gemma3"]
    model = build_model(seed=3, attn="eager")
    batch = build_batch(model, 2, 2, seed=3)
    calls = _captured_layer_calls(model, batch)
    sliding = allowed_keys(calls[0][2]["attention_mask"], 2, batch["input_ids"].shape[1],
                           batch["input_ids"].shape[1], torch.device("cpu"))
    full = allowed_keys(calls[1][2]["attention_mask"], *sliding.shape[:1], *sliding.shape[2:], torch.device("cpu"))
    assert bool((full & ~sliding).any()) and not bool((sliding & ~full).any())  # the window drops far keys
    image = batch["token_type_ids"].bool()
    later_image_key = full & image[:, None, :, None] & image[:, None, None, :] & torch.ones_like(full).triu(1)
    assert bool(later_image_key.any())  # an image token sees a later token of its image
    layer, hidden = calls[1][:2]
    gemma, llama = style_of(layer), STYLES[0]
    update = torch.randn_like(hidden[..., : layer.self_attn.o_proj.in_features])
    assert not torch.allclose(gemma.attention_residual(layer, hidden, update),
                              llama.attention_residual(layer, hidden, update))
    assert not torch.allclose(gemma.feed_forward(layer, hidden), llama.feed_forward(layer, hidden))


def test_an_attention_soft_cap_is_refused():
    model = FAMILIES["gemma3"][0](seed=0)
    layer = family_of(model).decoder_layers(model)[1]
    layer.self_attn.attn_logit_softcapping = 50.0
    with pytest.raises(NotImplementedError, match=r"attention-logit soft cap.*attn_logit_softcapping=50.0"):
        recognise_style(layer)


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
    refused = (r"LlamaDecoderLayer: unrecognised parts \['pre_feedforward_layernorm'\], against the nearest style "
               r"'llama'.*Add a LayerStyle")
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
