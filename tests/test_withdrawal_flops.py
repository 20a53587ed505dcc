"""FLOPs and KV-cache memory of plans that withdraw or prune visual tokens: the analytic counts against
FlopCounterMode on real generate() calls, and the counted KV-cache bytes against the cache's tensors."""

import pytest
import torch
from tiny_models import CORE_FAMILIES, FAMILIES, FIRST_WORD, _assemble

from analyses.cli import main
from analyses.measuring.flops import (
    DecoderShape,
    TokenCounts,
    countable_parts,
    counted_flops,
    cross_check,
    flop_counter,
    flops_figures,
    full_flops,
    layer_flops,
    layer_tokens,
    load_config,
    matmul_flops,
    plan_flops,
    shortv_convention_flops,
)
from analyses.measuring.memory import (
    cache_bytes,
    kv_cache_bytes,
    kv_cache_rows,
    prefill_kv_cache_bytes,
)
from eemllm_models import EfficiencyPlan, token_layout

PLANS = {  # two stages ranked by attention (the second in the short sequence), VTW, the stride control
    "two_stages": EfficiencyPlan(["frozen", "naavit", "composite", "full"], visual_keep=[1, 1, 0.5, 0.25]),
    "withdraw": EfficiencyPlan(["naavit", "composite", "frozen", "frozen"], visual_keep=[1, 1, 0, 0]),
    "stride": EfficiencyPlan(["full", "naavit", "frozen", "composite"], visual_keep=[1, 1, 0.5, 0.5],
                             visual_ranking="stride"),
}


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_withdrawal_count_matches_flop_counter_in_prefill_and_decode(family):
    # Real generate() calls with the cache (the prefill and two decoded tokens over the shorter caches); the
    # counts agree exactly per layer and component, the ranking at the layer before each drop included.
    build, make_batch = FAMILIES[family]
    model = build()
    batch = {k: v for k, v in make_batch(model, 1, images=2).items() if k != "attention_mask"}
    parts = countable_parts(model.config)
    for name, plan in PLANS.items():
        check = cross_check(model, plan, batch, max_new_tokens=3, parts=parts)
        off = check[check.counted != check.analytic]
        assert off.empty, f"{family} under {name}: analytic and FlopCounterMode counts differ:\n{off}"


def test_a_drop_from_layer_1_ranks_on_the_whole_prompt():
    build, make_batch = FAMILIES["llava"]
    model = build()
    batch = {k: v for k, v in make_batch(model, 1, images=2).items() if k != "attention_mask"}
    plan = EfficiencyPlan(["full", "frozen", "naavit", "composite"], visual_keep=[1, 0.5, 0.5, 0.25])
    check = cross_check(model, plan, batch, max_new_tokens=2)
    assert (check.counted == check.analytic).all(), check


def test_plain_forward_of_a_withdrawal_plan_counts_every_logit():
    build, make_batch = FAMILIES["llava"]
    model = build()
    batch = {k: v for k, v in make_batch(model, 1, images=2).items() if k != "attention_mask"}
    plan = PLANS["two_stages"]
    tokens = TokenCounts.from_layout(token_layout(model, batch["input_ids"]))
    with plan.applied(model), torch.no_grad(), flop_counter() as counter:
        model(**batch)
    analytic = matmul_flops(full_flops(model.config, plan, tokens, logits_to_keep=0))
    keys = ["part", "layer", "component"]
    merged = (analytic.groupby(keys, as_index=False).flops.sum()
              .merge(counted_flops(counter, model), on=keys, how="outer", suffixes=("_analytic", "_counted")))
    assert (merged.flops_analytic == merged.flops_counted).all(), merged


def test_layers_after_the_drop_count_the_tokens_they_see():
    config = load_config("llava-1.5-7b")
    tokens = TokenCounts.for_images(config, images=1, text_before=35, text_after=29)  # 64 text + 576 visual
    vtw = EfficiencyPlan.withdraw(32, 16)
    assert [t.visual for t in layer_tokens(vtw, tokens)] == [576] * 16 + [0] * 16
    assert layer_tokens(EfficiencyPlan.prune_tokens(32, 2, 0.3), tokens)[5].visual == 172  # floor(0.3 * 576)
    shape = DecoderShape.from_config(config)
    per_layer = plan_flops(config, vtw, tokens).groupby("layer").flops.sum()
    assert per_layer[20] == sum(layer_flops(shape, TokenCounts(35, 0, 29), "full").values())
    assert per_layer[3] == sum(layer_flops(shape, tokens, "full").values())
    # ShortV's paper formula with v = 0 after the drop; FastV's R = 50% from layer 2
    h, m = 4096, 11008
    dense = lambda n: 2 * n * (4 * h + 3 * m) * h + 4 * n**2 * h
    assert shortv_convention_flops(config, vtw) == 16 * dense(640) + 16 * dense(64)
    assert shortv_convention_flops(config, EfficiencyPlan.prune_tokens(32, 2, 0.5)) == 2 * dense(640) + 30 * dense(352)
    assert shortv_convention_flops(config, vtw) == plan_flops(config, vtw, tokens).flops.sum()
    # decoding: each step attends over 64 text + decoded keys in the withdrawn layers, 640 + decoded before
    frame = full_flops(config, vtw, tokens, decode_tokens=3)
    attention = frame.query("component == 'attention' and phase == 'decode'").set_index(["step", "layer"]).flops
    assert attention[2, 20] == 4 * (64 + 2) * 4096 and attention[2, 3] == 4 * (640 + 2) * 4096
    # VTW's ranking is none (keep 0); FastV's attention ranking adds one query row to the layer before the drop
    fastv, stride = (full_flops(config, EfficiencyPlan.prune_tokens(32, 2, 0.5, ranking=r), tokens)
                     for r in ("attention", "stride"))
    by_layer = [f[f.part == "decoder"].groupby(["layer", "component"]).flops.sum() for f in (fastv, stride)]
    extra = (by_layer[0] - by_layer[1])[lambda d: d != 0]
    assert set(extra.index.get_level_values("layer")) == {1}
    assert extra[1, "q_proj"] == 2 * h * h and extra[1, "kv_proj"] == 2 * 640 * h * h
    assert extra[1, "attention"] == 2 * 640 * h


def test_flops_figures_and_the_flops_command_count_a_withdrawal_plan(tmp_path, capsys):
    config = load_config("llava-1.5-7b")
    plan = EfficiencyPlan.withdraw(32, 16)
    tokens = TokenCounts(0, 576, 64)  # the paper models' default prompt
    figures = flops_figures(config, plan, tokens)
    assert 0.5 < figures["decoder_flops_ratio"] < 0.6 and figures["prefill_flops_ratio"] < 0.65
    path = plan.save(tmp_path / "vtw.json")
    assert main(["flops", "--model", "llava-1.5-7b", "--plan", str(path)]) == 0
    assert f"({figures['decoder_flops_ratio']:.1%} of the original)" in capsys.readouterr().out
    assert main(["flops", "--model", "llava-1.5-7b", "--plan", str(path), "--convention", "full"]) == 0
    assert f"prefill total: {figures['prefill_flops_ratio']:.1%} of the original" in capsys.readouterr().out


# ---- KV-cache bytes ---------------------------------------------------------------------------------
def _kv_plans(n_layers: int) -> list[EfficiencyPlan]:
    return [EfficiencyPlan.empty(n_layers), PLANS["two_stages"], PLANS["withdraw"],
            EfficiencyPlan(["full"] * n_layers, visual_keep=[1, 0.5, 0.5, 0.25])]


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_kv_cache_bytes_counted_equal_the_cache_tensors(family):
    """A padded batch of three prompts with two images each: after the prefill and after generate()."""
    build, make_batch = FAMILIES[family]
    model = build()
    batch = make_batch(model, 3, images=2, padding="left")
    layout = token_layout(model, batch["input_ids"], batch["attention_mask"])
    sizes = []
    for plan in _kv_plans(4):
        counted = kv_cache_bytes(model.config, plan, layout)
        sizes.append(counted)
        with plan.applied(model):
            assert prefill_kv_cache_bytes(model, batch)["kv_cache_bytes"] == counted
            if family == "gemma3" and plan.keep_stages()[:1] == ((1, 0.5),):
                continue  # cached decoding is refused there: its first full-attention layer is withdrawn
            with torch.no_grad():
                out = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                     suppress_tokens=list(range(FIRST_WORD)), return_dict_in_generate=True)
        assert cache_bytes(out.cache) == kv_cache_bytes(model.config, plan, layout, decoded=3)
    assert all(size < sizes[0] for size in sizes[1:])  # each withdrawal plan holds less than the original


def test_kv_cache_rows_of_a_batch_with_two_one_and_no_images():
    """The short rows are as long as the batch's longest: a prompt without images keeps every position."""
    build, _ = FAMILIES["llava"]
    model = build(seed=22)
    plan = EfficiencyPlan.withdraw(4, 2)
    for counts, removed in (([[16, 16], [], [16]], 0), ([[16, 16], [16]], 16)):
        batch = {**_assemble(counts, 23, "left"), "pixel_values": torch.randn(sum(map(len, counts)), 3, 32, 32)}
        layout = token_layout(model, batch["input_ids"], batch["attention_mask"])
        seq = batch["input_ids"].shape[1]
        assert kv_cache_rows(model.config, plan, layout) == [seq, seq, seq - removed, seq - removed]
        with plan.applied(model):
            assert prefill_kv_cache_bytes(model, batch)["kv_cache_bytes"] == kv_cache_bytes(model.config, plan,
                                                                                              layout)


def test_kv_cache_rows_of_sliding_window_layers_and_bad_input():
    gemma3 = FAMILIES["gemma3"][0]().config
    window = gemma3.text_config.sliding_window
    plan = EfficiencyPlan.withdraw(4, 2)
    rows = kv_cache_rows(gemma3, plan, TokenCounts(10, 500, 10), decoded=5)
    assert rows[1] == 525 and rows[3] == 25 and rows[0] == rows[2] == window - 1  # sliding, full, sliding, full
    with pytest.raises(ValueError, match="decoded must be >= 0"):
        kv_cache_rows(gemma3, plan, TokenCounts(1, 2, 3), decoded=-1)
    with pytest.raises(ValueError, match="the plan has 2 layers"):
        kv_cache_bytes(gemma3, EfficiencyPlan.empty(2), TokenCounts(1, 2, 3))
    with pytest.raises(TypeError, match="pass a transformers Cache"):
        cache_bytes(object())


def test_latency_reports_the_kv_cache_bytes_it_measured(default_model):
    from analyses.measuring.latency import measure_latency
    from eemllm_models import build_prompt, load_shapes_vqa
    from eemllm_models.generation import encode_prompts

    model, processor = default_model
    data = load_shapes_vqa("test", n=2)
    images, questions = list(data["image"]), list(data["question"])
    plans = {"original": None, "vtw": EfficiencyPlan.withdraw(12, 6), "fastv": EfficiencyPlan.prune_tokens(12, 3, 0.5)}
    frame = measure_latency(model, processor, images, questions, plans, new_tokens=3, warmup=0, repeats=1,
                            progress=False).set_index("variant")
    batch = encode_prompts(model, processor, images, [build_prompt(processor, q) for q in questions], "left")
    layout = token_layout(model, batch["input_ids"], batch["attention_mask"])
    empty = EfficiencyPlan.empty(12)
    for name, plan in plans.items():
        assert frame.kv_cache_bytes[name] == kv_cache_bytes(model.config, plan or empty, layout, decoded=2)
    assert frame.kv_cache_bytes["vtw"] < frame.kv_cache_bytes["fastv"] < frame.kv_cache_bytes["original"]
