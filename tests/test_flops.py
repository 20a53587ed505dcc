import pytest
import torch
from tiny_models import CLIP, FAMILIES, IMAGE_TOKEN, TEXT, llava_batch, tiny_llava
from transformers import (
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3TextConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLMoeConfig,
)

from analyses.choosing.methods import describe
from analyses.cli import main
from analyses.measuring.flops import (
    COMPONENTS,
    MATMUL_COMPONENTS,
    PARTS,
    DecoderShape,
    TokenCounts,
    countable_parts,
    counted_flops,
    cross_check,
    decoder_style,
    flop_counter,
    full_flops,
    layer_flops,
    load_config,
    matmul_flops,
    shortv_convention_flops,
)
from eemllm_models import EfficiencyPlan, build_prompt, load_shapes_vqa, token_layout

# ShortV (arXiv 2504.00502) Table 1, TFLOPs: original and under the published frozen layers.
TABLE_1 = {"llava-1.5-7b": (8.5, 4.7), "llava-1.5-13b": (16.6, 9.1)}


@pytest.mark.parametrize("model", TABLE_1)
def test_shortv_convention_reproduces_table_1(model):
    config = load_config(model)
    original = shortv_convention_flops(config, EfficiencyPlan.empty(config.text_config.num_hidden_layers))
    planned = shortv_convention_flops(config, EfficiencyPlan.preset(f"shortv:{model}"))
    assert (round(original / 1e12, 1), round(planned / 1e12, 1)) == TABLE_1[model]


def test_llava_next_counts_2880_visual_tokens():
    config = load_config("llava-next-7b")
    assert round(shortv_convention_flops(config, EfficiencyPlan.empty(32)) / 1e12, 1) == 42.7
    assert shortv_convention_flops(config, EfficiencyPlan.preset("shortv:llava-next-7b")) < 0.55 * 42.7e12


def test_flops_command_works_offline(capsys):
    assert main(["flops", "--model", "llava-1.5-7b", "--plan", "shortv:llava-1.5-7b"]) == 0
    out = capsys.readouterr().out
    assert "original 8.5 TFLOPs, planned 4.7 TFLOPs" in out
    assert f"({describe(EfficiencyPlan.preset('shortv:llava-1.5-7b'))})" in out


def test_convention_refuses_other_modes_and_unknown_models():
    config = load_config("llava-1.5-7b")
    with pytest.raises(ValueError, match="counts only full and frozen layers"):
        shortv_convention_flops(config, EfficiencyPlan.uniform(32, "naavit"))
    with pytest.raises(ValueError, match="not one of the shipped ones"):
        load_config("no-such-model-here")



# The full count, checked against torch's FlopCounterMode on real generate() calls.

PLANS = {
    "empty": ["full"] * 4,
    "frozen": ["frozen"] * 4,
    "naavit": ["naavit"] * 4,
    "composite": ["composite"] * 4,
    "mixed": ["full", "frozen", "naavit", "composite"],
}


def _assert_within_1_percent(check):
    assert len(check) > 0
    off = check[(check.ratio - 1).abs() > 0.01]
    assert off.empty, f"analytic and FlopCounterMode counts differ:\n{off}"


@pytest.mark.parametrize(("plan", "attn"), [(plan, "sdpa") for plan in PLANS] + [("mixed", "eager")])
def test_full_count_matches_flop_counter_in_every_mode(plan, attn):
    model = tiny_llava(attn=attn)
    check = cross_check(model, EfficiencyPlan(PLANS[plan]), llava_batch(model, 1, images=2), max_new_tokens=3)
    _assert_within_1_percent(check)
    assert set(check.part) == {"vision_tower", "projector", "decoder", "lm_head"}
    assert {"q_proj", "kv_proj", "o_proj", "attention", "mlp"} <= set(check.component)


TOWERS_COUNTED = {"llava", "gemma3", "idefics3", "smolvlm"}
"""Families whose vision tower and projector full_flops counts (the others' decoder and lm_head only)."""


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decoder_count_matches_flop_counter_in_every_family(family):
    # Real generate() calls of each family's tiny model on one prompt with two images: the original model
    # (the prefill and one decoded token: sliding-window caches show there) and a plan with every mode,
    # frozen twice in a row (a frozen run). The counts agree exactly per layer and component, so each
    # layer's mode is checked on its own. Towers full_flops does not count are left out; the SigLIP towers
    # (Gemma 3, with its attention-pooling head; Idefics3 and SmolVLM per sub-image) are counted.
    build, make_batch = FAMILIES[family]
    model = build()
    batch = {k: v for k, v in make_batch(model, 1, images=2).items() if k != "attention_mask"}
    parts = countable_parts(model.config)
    assert parts == (PARTS if family in TOWERS_COUNTED else ("decoder", "lm_head"))
    n_layers = model.config.get_text_config().num_hidden_layers
    every_mode = [("frozen", "frozen", "naavit", "composite")[i % 4] for i in range(n_layers)]
    for modes, new_tokens in ((["full"] * n_layers, 2), (every_mode, 1)):
        check = cross_check(model, EfficiencyPlan(modes), batch, max_new_tokens=new_tokens, parts=parts)
        assert set(check.part) == set(parts) and set(COMPONENTS) <= set(check.component), (modes, check)
        off = check[check.counted != check.analytic]
        assert off.empty, f"{family} under {modes}: analytic and FlopCounterMode counts differ:\n{off}"


def _tiny_configs():
    text = {**TEXT, "head_dim": 16}
    qwen3 = Qwen3VLConfig(text_config=text, vision_config={"deepstack_visual_indexes": [0, 1]})
    gemma3 = Gemma3Config(text_config=Gemma3TextConfig(**text, sliding_window=8, query_pre_attn_scalar=24,
                                                       layer_types=["sliding_attention", "full_attention"] * 2))
    return LlavaConfig(text_config=LlamaConfig(**text)), qwen3, gemma3


def _layer0(frame, phase="prefill"):
    rows = frame[(frame.part == "decoder") & (frame.layer == 0) & (frame.phase == phase)]
    return rows.groupby("component").flops.sum().to_dict()


def test_decoder_styles_share_the_matrix_products_and_differ_in_element_wise_work():
    llama, qwen3, gemma3 = _tiny_configs()
    assert [decoder_style(c).name for c in (llama, qwen3, gemma3)] == ["llama", "qwen3", "gemma3"]
    tokens, e = TokenCounts(5, 8, 7), 4  # 20 tokens; rms_norm costs 4 per element
    n, h, q_width, kv_width = 20, 64, 4 * 16, 2 * 16
    frames = {c.get_text_config().model_type: full_flops(c, EfficiencyPlan.uniform(4, "naavit"), tokens,
                                                         decode_tokens=12, parts=("decoder", "lm_head"))
              for c in (llama, qwen3, gemma3)}
    products = {t: matmul_flops(f).groupby(["step", "component"]).flops.sum() for t, f in frames.items()}
    assert products["llama"].equals(products["qwen3_vl_text"])
    llama0, qwen0, gemma0 = (_layer0(frames[t]) for t in ("llama", "qwen3_vl_text", "gemma3_text"))
    assert "qk_norm" not in llama0 and qwen0["qk_norm"] == gemma0["qk_norm"] == e * n * (q_width + kv_width)
    assert qwen0["norm"] == llama0["norm"] == e * 2 * n * h
    assert gemma0["norm"] == e * 4 * n * h  # input, post-attention, pre- and post-feed-forward norms
    assert gemma0["activation"] == (8 + 1) * n * 128  # GELU-tanh and the gate
    outside = frames["gemma3_text"].query("part == 'decoder' and layer == -1 and step == 0").set_index("component")
    assert outside.flops["scale"] == n * h and outside.flops["rotary"] == 3 * 2 * n * 16  # two rotary tables
    deepstack = frames["qwen3_vl_text"].query("layer == -1 and component == 'residual'")
    assert deepstack.flops.tolist() == [2 * 8 * h]  # two deepstack additions to the visual rows, prefill only
    # decoding: sliding-window layers (0, 2) keep the last 8 keys, full ones every key
    attention = frames["gemma3_text"].query("component == 'attention' and step == 12").set_index("layer").flops
    assert attention[0] == attention[2] == 4 * 8 * q_width and attention[1] == 4 * (n + 12) * q_width
    assert not frames["gemma3_text"].component.isin(["softcap"]).any()


def test_gemma3_soft_capping_is_element_wise_work():
    _, _, gemma3 = _tiny_configs()
    gemma3.text_config.final_logit_softcapping, gemma3.text_config.attn_logit_softcapping = 30.0, 50.0
    frame = full_flops(gemma3, EfficiencyPlan.empty(4), TokenCounts(5, 8, 7), parts=("decoder", "lm_head"))
    caps = frame[frame.component == "softcap"].groupby("part").flops.sum()
    assert caps["lm_head"] == 3 * 64 and caps["decoder"] == 4 * 3 * 20 * 20 * 4  # per logit; per score and head
    assert set(matmul_flops(frame).component) <= MATMUL_COMPONENTS


def test_full_count_refuses_decoders_and_towers_it_cannot_count():
    tokens = TokenCounts(5, 8, 7)
    moe = Qwen3VLMoeConfig(text_config={**TEXT, "head_dim": 16})
    assert decoder_style(moe) is None and countable_parts(moe) == ("lm_head",)
    with pytest.raises(NotImplementedError, match="'qwen3_vl_moe_text'.*DECODER_STYLES"):
        full_flops(moe, EfficiencyPlan.empty(4), tokens, parts=("decoder", "lm_head"))
    assert layer_flops(DecoderShape.from_config(moe), tokens, "full")["q_proj"] > 0  # the ShortV count still runs
    _, qwen3, _ = _tiny_configs()
    with pytest.raises(NotImplementedError, match=r"vision tower 'qwen3_vl_vision'.*parts=\('decoder', 'lm_head'\)"):
        full_flops(qwen3, EfficiencyPlan.empty(4), tokens)
    assert countable_parts(qwen3) == ("decoder", "lm_head")


def test_gemma3_tower_is_pooled_to_its_image_tokens():
    # Gemma 3 4B's SigLIP: 896 px images, 14 px patches (4096 per image), no attention-pooling head,
    # features pooled 4 x 4 into 256 tokens, RMS-normed and projected to the decoder's width
    vision = {"image_size": 896, "patch_size": 14, "hidden_size": 1152, "intermediate_size": 4304,
              "num_hidden_layers": 27, "num_attention_heads": 16, "vision_use_head": False}
    config = Gemma3Config(vision_config=vision, text_config=Gemma3TextConfig(hidden_size=2560, num_hidden_layers=4))
    tokens = TokenCounts.for_images(config, images=2, text_before=10, text_after=20)
    assert tokens.visual == 2 * 256
    frame = full_flops(config, EfficiencyPlan.empty(4), tokens)
    by_part = frame.groupby(["part", "component"]).flops.sum()
    assert by_part["projector"].to_dict() == {"projection": 2 * 512 * 1152 * 2560, "pool": 2 * 4096 * 1152,
                                              "norm": 4 * 512 * 1152}
    assert "head" not in by_part["vision_tower"] and by_part["vision_tower", "attention"] == 2 * 27 * 4 * 4096**2 * 1152
    with pytest.raises(ValueError, match="not a whole number of images"):
        full_flops(config, EfficiencyPlan.empty(4), TokenCounts(10, 300, 20))


def test_plain_forward_counts_every_logit_and_every_tower_layer():
    # three tower layers, features taken from the second to last (as LLaVA-1.5), with the CLS token
    torch.manual_seed(0)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**{**CLIP, "num_hidden_layers": 3}),
                         text_config=LlamaConfig(**TEXT), image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
                         vision_feature_select_strategy="full", image_seq_length=17)
    model = LlavaForConditionalGeneration(config).eval()
    batch = llava_batch(model, 1, images=1)
    ids = batch["input_ids"]
    at = int((ids[0] == IMAGE_TOKEN).nonzero()[0])
    batch["input_ids"] = torch.cat([ids[:, :at], torch.full((1, 1), IMAGE_TOKEN), ids[:, at:]], dim=1)
    del batch["attention_mask"]
    plan = EfficiencyPlan(PLANS["mixed"])
    tokens = TokenCounts.from_layout(token_layout(model, batch["input_ids"]))
    assert tokens.visual == 17
    with plan.applied(model), torch.no_grad(), flop_counter() as counter:
        model(**batch)
    analytic = matmul_flops(full_flops(config, plan, tokens, logits_to_keep=0))
    keys = ["part", "layer", "component"]
    merged = analytic[keys + ["flops"]].merge(counted_flops(counter, model), on=keys, how="outer",
                                              suffixes=("_analytic", "_counted")).fillna(0)
    assert (merged.flops_analytic == merged.flops_counted).all(), merged
    assert sorted(analytic[analytic.part == "vision_tower"].layer.unique()) == [-1, 0, 1, 2]
    lm_head = analytic[analytic.component == "lm_head"].flops.sum()
    assert lm_head == 2 * tokens.total * TEXT["hidden_size"] * TEXT["vocab_size"]


def test_full_count_decoder_projections_agree_with_the_shortv_style_count():
    config = load_config("llava-1.5-7b")
    tokens = TokenCounts.for_images(config, images=1, text_before=35, text_after=29)
    assert tokens.visual == 576
    shape = DecoderShape.from_config(config)
    for mode in ("full", "frozen", "composite"):
        frame = full_flops(config, EfficiencyPlan.uniform(32, mode), tokens)
        layer0 = frame[(frame.part == "decoder") & (frame.layer == 0)].set_index("component").flops
        assert {c: layer0[c] for c in COMPONENTS} == layer_flops(shape, tokens, mode)


def test_full_count_layout_and_decode_steps():
    config = load_config("llava-1.5-7b")
    tokens = TokenCounts.for_images(config, images=2, text_before=10, text_after=54)
    frame = full_flops(config, EfficiencyPlan.preset("shortv:llava-1.5-7b"), tokens, decode_tokens=3)
    assert list(frame.columns) == ["phase", "step", "part", "layer", "mode", "component", "flops"]
    assert set(frame.step) == {0, 1, 2, 3} and set(frame[frame.phase == "decode"]["mode"]) == {"full"}
    assert set(frame[(frame.part == "decoder") & (frame.phase == "prefill") & (frame.layer >= 0)]["mode"]) == {
        "full", "frozen"}
    attention = frame[(frame.component == "attention") & (frame.part == "decoder")].groupby("step").flops.sum()
    # each decoded token attends to one more key: 4 * heads * head_dim * 32 layers more per step
    assert (attention.loc[[2, 3]].to_numpy() - attention.loc[[1, 2]].to_numpy() == 4 * 4096 * 32).all()
    tower = frame[frame.part == "vision_tower"]
    assert tower.layer.max() == 23  # vision_feature_layer -2: the last tower layer still runs
    one_image = full_flops(config, EfficiencyPlan.empty(32), TokenCounts.for_images(config, 1, 10, 54))
    assert tower.flops.sum() == 2 * one_image[one_image.part == "vision_tower"].flops.sum()
    assert set(matmul_flops(frame).component) <= MATMUL_COMPONENTS
    assert {"norm", "rotary", "softmax", "activation"} <= set(frame.component) - MATMUL_COMPONENTS


def test_full_count_refuses_towers_it_cannot_count():
    config = load_config("llava-next-7b")
    tokens = TokenCounts(35, 2880, 29)
    with pytest.raises(NotImplementedError, match="anyres tiling"):
        full_flops(config, EfficiencyPlan.empty(32), tokens)
    decoder = full_flops(config, EfficiencyPlan.empty(32), tokens, parts=("decoder", "lm_head"))
    assert set(decoder.part) == {"decoder", "lm_head"}
    with pytest.raises(ValueError, match="not a whole number of images"):
        full_flops(load_config("llava-1.5-7b"), EfficiencyPlan.empty(32), TokenCounts(35, 500, 29))


@pytest.mark.slow
def test_full_count_matches_flop_counter_on_the_shipped_model(default_model):
    model, processor = default_model
    row = load_shapes_vqa("test", n=1)[0]
    batch = processor(images=[row["image"]], text=[build_prompt(processor, row["question"])], return_tensors="pt")
    plan = EfficiencyPlan(["full", "frozen", "naavit", "composite"] * (model.config.text_config.num_hidden_layers // 4))
    _assert_within_1_percent(cross_check(model, plan, dict(batch), max_new_tokens=3))


def test_flops_command_full_count(capsys):
    assert main(["flops", "--model", "llava-1.5-7b", "--plan", "shortv:llava-1.5-7b", "--convention", "full"]) == 0
    out = capsys.readouterr().out
    assert "prefill vision_tower" in out and "decode decoder" in out and "0.552" in out
    assert main(["flops", "--model", "llava-next-7b", "--convention", "full"]) == 2
    assert "give --visual-tokens" in capsys.readouterr().err
    assert main(["flops", "--model", "llava-next-7b", "--convention", "full", "--visual-tokens", "2880"]) == 0
    assert "counting the language model only" in capsys.readouterr().out


def test_flops_are_printed_in_a_unit_that_shows_them():
    from analyses.measuring.flops import format_flops

    assert format_flops(8.46e12) == "8.5 TFLOPs" and format_flops(1.16e9) == "1.2 GFLOPs"
    assert format_flops(2.3e7) == "23.0 MFLOPs" and format_flops(512) == "512.0 FLOPs"


def _default_plan_with_every_mode(tmp_path, tokens):
    import numpy as np
    import xarray as xr

    from analyses.choosing.policies import budget_plan

    contribution = np.linspace(0.01, 0.2, 36).reshape(1, 12, 3)
    contribution[..., 0] += 1.0  # frozen costs most: the plan mixes naavit and composite
    modes = xr.Dataset({"contribution": (("sample", "layer", "mode"), contribution)},
                       coords={"sample": ["a"], "layer": range(12), "mode": ["frozen", "naavit", "composite"]},
                       attrs={"probe": "mode_contribution"})
    plan = budget_plan(modes, load_config("default"), tokens, target=0.7)
    assert set(plan.modes) - {"full", "frozen"}, plan.modes  # a mode the paper formula has no count for
    return plan, plan.save(tmp_path / "budget.json")


def test_flops_command_prints_the_ratio_a_plan_recorded_under_each_convention(tmp_path, capsys):
    tokens = TokenCounts(3, 100, 21)
    _plan, path = _default_plan_with_every_mode(tmp_path, tokens)
    provenance = EfficiencyPlan.load(path).provenance
    assert provenance["flops_convention"] == "shortv" and provenance["prefill_flops_convention"] == "full"
    assert main(["flops", "--model", "default", "--plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"({provenance['flops_ratio']:.1%} of the original)" in out and "24 text + 100 visual tokens" in out
    assert "MFLOPs" in out or "GFLOPs" in out
    assert "0.0 TFLOPs" not in out
    assert main(["flops", "--model", "default", "--plan", str(path), "--convention", "full"]) == 0
    out = capsys.readouterr().out
    assert f"prefill total: {provenance['prefill_flops_ratio']:.1%} of the original (full convention)" in out
    assert "TFLOPs" not in out


def test_flops_of_the_default_model_count_its_real_prompts(tmp_path, capsys):
    from transformers import AutoProcessor

    from analyses.measuring.flops import flops_figures
    from analyses.measuring.tokens import (
        DEFAULT_ROWS,
        each_prompt_token_counts,
        resolve_token_counts,
    )
    from eemllm_models import default_model_path

    config = load_config("default")
    processor = AutoProcessor.from_pretrained(default_model_path())
    counted = each_prompt_token_counts(config, processor, load_shapes_vqa(**DEFAULT_ROWS))
    tokens, source = resolve_token_counts("default")
    assert tokens == TokenCounts.mean(counted) and "shapes-vqa test (n=28)" in source
    assert tokens.visual == 100 and tokens.text != 64 and len({c.text for c in counted}) > 1
    plan = EfficiencyPlan.from_layers(12, [2, 3, 4, 7, 9, 10, 11])  # no recorded tokens
    path = plan.save(tmp_path / "plan.json")
    assert main(["flops", "--model", "default", "--plan", str(path)]) == 0
    ratio = flops_figures(config, plan, tokens)["decoder_flops_ratio"]
    assert f"({ratio:.1%} of the original)" in capsys.readouterr().out
    # the paper models keep ShortV's 64 text tokens
    assert resolve_token_counts("llava-1.5-7b")[0] == TokenCounts(0, 576, 64)
