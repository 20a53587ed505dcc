"""Token withdrawal (VTW) and pruning (FastV): the plan's visual_keep, fast == reference, the KV cache, generate()."""

import json
import logging

import pytest
import torch

from eemllm_models import EfficiencyPlan, apply_plan, load_pruned, save_pruned, token_layout
from eemllm_models.families import family_of
from eemllm_models.modes import flex_available
from eemllm_models.withdrawal import kept_counts, memory_of, select_visual
from tiny_models import CORE_FAMILIES, FAMILIES, FIRST_WORD, IMAGE_TOKEN, _assemble

ATOL = 1e-5
PLANS = {  # name: (modes, visual_keep, ranking)
    "prune_half": (["full"] * 4, [1, 1, 0.5, 0.5], "attention"),
    "two_stages_modes": (["frozen", "naavit", "composite", "frozen"], [1, 0.5, 0.5, 0.25], "attention"),
    "withdraw_modes": (["naavit", "frozen", "composite", "full"], [1, 1, 0, 0], "attention"),
    "stride_modes": (["composite", "frozen", "frozen", "naavit"], [1, 0.5, 0.5, 0.5], "stride"),
}
WORDS_ONLY = {"suppress_tokens": list(range(FIRST_WORD)), "max_new_tokens": 5, "do_sample": False}


def _family_params():
    """Every family, the :data:`CORE_FAMILIES` in the main run and the others in the slow step."""
    return [pytest.param(family, id=family, marks=() if family in CORE_FAMILIES else pytest.mark.slow)
            for family in FAMILIES]


@pytest.fixture(scope="module", params=_family_params())
def model(request):
    build_model, build_batch = FAMILIES[request.param]
    model = build_model(seed=2)
    model.make_batch = lambda *args, **kwargs: build_batch(model, *args, **kwargs)
    return model


def _plan(name: str) -> EfficiencyPlan:
    modes, keep, ranking = PLANS[name]
    return EfficiencyPlan(modes, visual_keep=keep, visual_ranking=ranking)


def _logits(model, batch, plan=None, implementation="fast", **kwargs):
    with torch.no_grad():
        if plan is None:
            return model(**batch, **kwargs).logits
        with apply_plan(model, plan, implementation):
            return model(**batch, **kwargs).logits


def _text(model, batch) -> torch.Tensor:
    """``[batch, seq]`` bool: the text positions (valid, not visual), where fast and reference must agree."""
    return token_layout(model, batch["input_ids"], batch["attention_mask"]).text


# ---- the plan -------------------------------------------------------------------------------------
def test_visual_keep_defaults_and_constructors():
    plan = EfficiencyPlan.empty(4)
    assert plan.visual_keep == [1.0] * 4 and not plan.withdraws and plan.keep_stages() == ()
    vtw = EfficiencyPlan.withdraw(6, 3, policy="vtw")
    assert vtw.visual_keep == [1, 1, 1, 0, 0, 0] and vtw.modes == ["full"] * 6 and vtw.provenance["policy"] == "vtw"
    assert vtw.withdraws and not vtw.is_empty and vtw.keep_stages() == ((3, 0.0),)
    fastv = EfficiencyPlan.prune_tokens(6, 2, 0.5)
    assert fastv.visual_keep == [1, 1, 0.5, 0.5, 0.5, 0.5] and fastv.visual_ranking == "attention"
    assert EfficiencyPlan.prune_tokens(6, 2, 0.5, ranking="stride").visual_ranking == "stride"
    mixed = EfficiencyPlan.from_layers(4, {1: "frozen"}).with_visual_keep([1, 0.75, 0.75, 0.25])
    assert mixed.modes[1] == "frozen" and mixed.keep_stages() == ((1, 0.75), (3, 0.25))


def test_visual_keep_validation_errors():
    with pytest.raises(ValueError, match="visual_keep has 3 fractions but the plan has 4 layers; give one"):
        EfficiencyPlan(["full"] * 4, visual_keep=[1, 1, 1])
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]; got \[\(2, 1.5\)\].*use 1.0 to keep"):
        EfficiencyPlan(["full"] * 4, visual_keep=[1, 1, 1.5, 1])
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        EfficiencyPlan(["full"] * 4, visual_keep=[1, 1, -0.5, float("nan")])
    with pytest.raises(ValueError, match="must not increase with depth: layer 3 keeps 0.5 after layer 2 kept 0.25.*"
                                         r"non-increasing \(e.g. visual_keep\[3\] = 0.25\)"):
        EfficiencyPlan(["full"] * 4, visual_keep=[1, 0.5, 0.25, 0.5])
    with pytest.raises(ValueError, match=r"visual_keep\[0\] must be 1.0.*from layer 1 or later"):
        EfficiencyPlan(["full"] * 4, visual_keep=[0.5] * 4)
    with pytest.raises(ValueError, match=r"unknown visual_ranking 'random'; choose from \['attention', 'stride'\]"):
        EfficiencyPlan(["full"] * 4, visual_keep=[1, 0, 0, 0], visual_ranking="random")
    with pytest.raises(ValueError, match=r"from_layer must be in 1..3"):
        EfficiencyPlan.withdraw(4, 0)


def test_visual_keep_json_round_trip_and_older_plans(tmp_path):
    plan = EfficiencyPlan.prune_tokens(5, 2, 0.3, ranking="stride", model="m").with_visual_keep(
        [1, 1, 0.3, 0.3, 0.1])
    assert EfficiencyPlan.from_json(plan.to_json()) == plan
    loaded = EfficiencyPlan.load(plan.save(tmp_path / "plan.json"))
    assert loaded.visual_keep == [1, 1, 0.3, 0.3, 0.1] and loaded.visual_ranking == "stride"
    older = {"modes": ["full", "frozen", "full"], "provenance": {"policy": "shortv"}}  # written before visual_keep
    assert EfficiencyPlan.from_dict(older).visual_keep == [1.0] * 3
    assert EfficiencyPlan.from_dict(older).to_dict() == older  # a plan that keeps every token writes what it read
    (tmp_path / "old.json").write_text(json.dumps(older))
    assert EfficiencyPlan.load(tmp_path / "old.json") == EfficiencyPlan.from_layers(3, [1], policy="shortv")


def test_kept_counts_round_down_per_sequence():
    assert kept_counts(0.5, torch.tensor([16, 15, 0, 1])).tolist() == [8, 7, 0, 0]
    assert kept_counts(0.3, torch.tensor([10, 20])).tolist() == [3, 6]  # 0.3 * 10 is 2.9999... in floats
    assert kept_counts(1.0, torch.tensor([7])).tolist() == [7] and kept_counts(0.0, torch.tensor([7])).tolist() == [0]


def test_select_visual_attention_and_stride():
    candidates = torch.tensor([[False, True, True, True, True, False]])
    scores = torch.tensor([[0.9, 0.1, 0.4, 0.4, 0.3, 0.8]])
    top = select_visual("attention", candidates, torch.tensor([2]), scores)
    assert top.tolist() == [[False, False, True, True, False, False]]  # the text token's 0.9 is no candidate
    tie = select_visual("attention", candidates, torch.tensor([1]), scores)
    assert tie.nonzero()[:, 1].tolist() == [2]  # a tie goes to the earlier token
    every_other = select_visual("stride", candidates, torch.tensor([2]))
    assert every_other.nonzero()[:, 1].tolist() == [2, 4]


# ---- fast == reference ------------------------------------------------------------------------------
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("name", PLANS)
def test_fast_matches_reference_at_text_positions(model, name, padding):
    batch = model.make_batch(3, 2, seed=len(name) + len(padding), padding=padding)
    plan = _plan(name)
    fast = _logits(model, batch, plan)
    reference = _logits(model, batch, plan, "reference")
    text = _text(model, batch)
    torch.testing.assert_close(fast[text], reference[text], rtol=ATOL, atol=ATOL)
    kept_all = EfficiencyPlan(plan.modes)  # the same modes keeping every token
    assert (fast[text] - _logits(model, batch, kept_all)[text]).abs().max() > 1e-3  # the withdrawal changed something


def test_batch_with_prompts_of_two_one_and_no_images():
    """Each prompt keeps its own floor(keep * n_visual): the short rows differ in length across the batch."""
    build_model, _ = FAMILIES["llava"]
    model = build_model(seed=22)
    batch = {**_assemble([[16, 16], [], [16]], 23, "left"), "pixel_values": torch.randn(3, 3, 32, 32)}
    text = _text(model, batch)
    for keep in ([1, 1, 0.5, 0.5], [1, 0.3, 0.2, 0.1], [1, 0.5, 0.5, 0]):
        plan = EfficiencyPlan(["frozen", "naavit", "composite", "frozen"], visual_keep=keep)
        torch.testing.assert_close(_logits(model, batch, plan)[text], _logits(model, batch, plan, "reference")[text],
                                   rtol=ATOL, atol=ATOL)


def test_keep_one_is_the_plan_of_modes_alone(model):
    batch = model.make_batch(3, 2, seed=21)
    modes = ["frozen", "naavit", "full", "composite"]
    expected = _logits(model, batch, EfficiencyPlan(modes))
    assert torch.equal(_logits(model, batch, EfficiencyPlan(modes, visual_keep=[1.0] * 4)), expected)
    assert torch.equal(_logits(model, batch, EfficiencyPlan(["full"] * 4, visual_keep=[1.0] * 4)),
                       _logits(model, batch))


@pytest.mark.parametrize("implementation", ["fast", "reference"])
def test_withdrawn_tokens_no_longer_reach_the_text(implementation):
    """With every visual token withdrawn from layer 2, what the visual rows hold there changes no text logit."""
    build_model, build_batch = FAMILIES["llava"]
    model = build_model(seed=3)
    batch = build_batch(model, 2, 2, seed=4)
    layout = token_layout(model, batch["input_ids"], batch["attention_mask"])
    plan = EfficiencyPlan.withdraw(4, 2)
    layer = family_of(model).decoder_layers(model)[2]
    hook = layer.register_forward_pre_hook(
        lambda module, args: (args[0].masked_fill(layout.visual[..., None], 3.0), *args[1:]))
    try:
        scrambled = _logits(model, batch, plan, implementation)
    finally:
        hook.remove()
    torch.testing.assert_close(scrambled[layout.text], _logits(model, batch, plan, implementation)[layout.text],
                               rtol=ATOL, atol=ATOL)


def test_attention_ranking_keeps_what_the_last_position_attends_to_most():
    """The tokens kept are the top ones of HF's own (eager) attention weights of the last prompt position at
    the layer before, averaged over heads."""
    build_model, build_batch = FAMILIES["llava"]
    model = build_model(seed=5, attn="eager")
    batch = build_batch(model, 3, 2, seed=6, padding="left")
    layout = token_layout(model, batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        weights = model(**batch, output_attentions=True).attentions[1][:, :, -1].mean(1)  # [batch, keys]
    counts = kept_counts(0.25, layout.n_visual)
    expected = torch.zeros_like(layout.visual)
    for b in range(3):
        visual = layout.visual[b].nonzero()[:, 0]
        expected[b, visual[weights[b, visual].argsort(descending=True)[:counts[b]]]] = True
    for implementation in ("fast", "reference"):
        with torch.no_grad(), apply_plan(model, EfficiencyPlan.prune_tokens(4, 2, 0.25), implementation):
            cache = model(**batch, use_cache=True).cache
        removed = memory_of(cache).stages[0].removed
        assert torch.equal(layout.visual & ~removed, expected)


def test_fast_kv_caches_hold_only_kept_positions():
    build_model, build_batch = FAMILIES["llava"]
    model = build_model(seed=7)
    batch = build_batch(model, 3, 2, seed=8)  # 32 visual tokens per prompt
    seq = batch["input_ids"].shape[1]
    plan = EfficiencyPlan(["full"] * 4, visual_keep=[1, 0.5, 0.5, 0.25])
    lengths = {}
    for implementation in ("fast", "reference"):
        with torch.no_grad(), apply_plan(model, plan, implementation):
            cache = model(**batch, use_cache=True).cache
        lengths[implementation] = [layer.keys.shape[2] for layer in cache.layers]
    assert lengths["reference"] == [seq] * 4
    assert lengths["fast"] == [seq, seq - 16, seq - 16, seq - 24]


def test_hidden_states_output_is_full_length_under_withdrawal():
    build_model, build_batch = FAMILIES["llava"]
    model = build_model(seed=9)
    batch = build_batch(model, 2, 2, seed=10)
    text = _text(model, batch)
    plan = _plan("two_stages_modes")
    outputs = {}
    for implementation in ("fast", "reference"):
        with torch.no_grad(), apply_plan(model, plan, implementation):
            outputs[implementation] = model(**batch, output_hidden_states=True)
    fast, reference = outputs["fast"], outputs["reference"]
    assert len(fast.hidden_states) == len(reference.hidden_states) == 5
    for ours, theirs in zip(fast.hidden_states, reference.hidden_states):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours[text], theirs[text], rtol=ATOL, atol=ATOL)
    torch.testing.assert_close(fast.logits[text], reference.logits[text], rtol=ATOL, atol=ATOL)


def test_eager_attention_fast_matches_reference():
    for family in ("llava", "gemma3"):
        build_model, build_batch = FAMILIES[family]
        model = build_model(seed=11, attn="eager")
        batch = build_batch(model, 3, 2, seed=12, padding="right")
        plan = EfficiencyPlan(["frozen", "naavit", "full", "composite"], visual_keep=[1, 1, 0.5, 0.25])
        text = _text(model, batch)
        torch.testing.assert_close(_logits(model, batch, plan)[text], _logits(model, batch, plan, "reference")[text],
                                   rtol=ATOL, atol=ATOL)


@pytest.mark.skipif(not flex_available(), reason="this torch has no FlexAttention")
def test_flex_naavit_on_the_short_sequence_matches_reference():
    for family in ("llava", "gemma3"):
        build_model, build_batch = FAMILIES[family]
        model = build_model(seed=24)
        batch = build_batch(model, 3, 2, seed=25, padding="right")
        plan = EfficiencyPlan(["naavit"] * 4, visual_keep=[1, 0.5, 0.5, 0.25])
        with torch.no_grad(), apply_plan(model, plan, "fast", naavit_kernel="flex_eager"):
            fast = model(**batch).logits
        text = _text(model, batch)
        torch.testing.assert_close(fast[text], _logits(model, batch, plan, "reference")[text], rtol=ATOL, atol=ATOL)


# ---- generate() -------------------------------------------------------------------------------------
def _generate(model, batch, plan, implementation, use_cache=True):
    with torch.no_grad(), apply_plan(model, plan, implementation):
        return model.generate(**batch, **WORDS_ONLY, use_cache=use_cache)


@pytest.mark.parametrize("ranking,keep", [("attention", 0.0), ("stride", 0.5)])
def test_generate_with_cache_equals_recomputing(model, ranking, keep):
    """VTW and the stride control rank without the last position, so recomputing every step (which ranks
    again with the generated tokens) must give what the cached decoding gives; both implementations."""
    batch = model.make_batch(3, 2, seed=13)
    plan = EfficiencyPlan(["frozen", "full", "naavit", "composite"], visual_keep=[1, 1, keep, keep * 0.5],
                          visual_ranking=ranking)
    recomputed = _generate(model, batch, plan, "reference", use_cache=False)
    assert torch.equal(_generate(model, batch, plan, "reference"), recomputed)
    assert torch.equal(_generate(model, batch, plan, "fast"), recomputed)
    assert torch.equal(_generate(model, batch, plan, "fast", use_cache=False), recomputed)


def test_generate_fast_equals_reference_with_attention_ranking(model):
    """FastV's ranking reads the last prompt position at prefill; cached decoding keeps that choice."""
    batch = model.make_batch(3, 2, seed=14, padding="left")
    plan = EfficiencyPlan(["naavit", "frozen", "full", "frozen"], visual_keep=[1, 1, 0.5, 0.5])
    assert torch.equal(_generate(model, batch, plan, "fast"), _generate(model, batch, plan, "reference"))


def test_cached_decoding_refused_where_the_model_sizes_its_masks_from_a_withdrawn_layer():
    build_model, build_batch = FAMILIES["gemma3"]  # layers: sliding, full, sliding, full
    model = build_model(seed=15)
    batch = build_batch(model, 2, 1, seed=16)
    plan = EfficiencyPlan.withdraw(4, 1)
    with pytest.raises(ValueError, match="sizes its masks from \\(layer 1\\).*withdraw from layer 2 or later, apply "
                                         "the plan with implementation='reference', or generate with use_cache=False"):
        _generate(model, batch, plan, "fast")
    assert torch.equal(_generate(model, batch, plan, "reference"),
                       _generate(model, batch, plan, "fast", use_cache=False))


def test_cache_of_another_plan_is_refused():
    build_model, build_batch = FAMILIES["llava"]
    model = build_model(seed=17)
    batch = build_batch(model, 1, 1, seed=18)
    with torch.no_grad():
        with apply_plan(model, EfficiencyPlan.withdraw(4, 2)):
            cache = model(**batch, use_cache=True).cache
        step = {"input_ids": torch.tensor([[FIRST_WORD]]), "cache": cache}
        with apply_plan(model, EfficiencyPlan.withdraw(4, 3)), pytest.raises(ValueError, match="another plan"):
            model(**step)
        with apply_plan(model, EfficiencyPlan.withdraw(4, 2)), pytest.raises(NotImplementedError,
                                                                            match="every image in the first call"):
            model(input_ids=torch.tensor([[FIRST_WORD, IMAGE_TOKEN]]), cache=cache)


# ---- no images, saving ------------------------------------------------------------------------------
def test_prompt_without_image_tokens_is_a_logged_no_op(caplog):
    build_model, _ = FAMILIES["llava"]
    model = build_model(seed=19)
    ids = torch.randint(FIRST_WORD, 64, (2, 9))
    original = _logits(model, {"input_ids": ids})
    with caplog.at_level(logging.INFO, logger="eemllm_models.apply"):
        for implementation in ("fast", "reference"):
            assert torch.equal(_logits(model, {"input_ids": ids}, EfficiencyPlan.withdraw(4, 1), implementation),
                               original)
    assert caplog.text.count("no image tokens") == 2


def test_save_and_load_pruned_keeps_visual_keep(tmp_path):
    build_model, build_batch = FAMILIES["llava"]
    model = build_model(seed=20)
    batch = build_batch(model, 2, 2, seed=21)
    plan = EfficiencyPlan(["frozen", "full", "naavit", "full"], {"policy": "test"}, [1, 0.5, 0.5, 0], "stride")
    expected = _logits(model, batch, plan)
    save_pruned(model, plan, tmp_path / "pruned")
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config["eemllm_plan"]["visual_keep"] == [1, 0.5, 0.5, 0]
    loaded, loaded_plan = load_pruned(tmp_path / "pruned")
    assert loaded_plan == plan
    assert torch.equal(_logits(loaded, batch), expected)
