import logging

import pytest
import torch

from eemllm_models import EfficiencyPlan, apply_plan, token_layout
from eemllm_models.families import family_of
from eemllm_models.modes import RowSplit, fast_forward
from tiny_models import FAMILIES, FIRST_WORD, IMAGE_TOKEN, family_variants

MODES = ("frozen", "naavit", "composite")


@pytest.fixture(scope="module", params=[pytest.param(p.values, id=p.id, marks=p.marks)
                                        for p in family_variants("sdpa", "eager")])
def model(request):
    family, attn = request.param
    build_model, build_batch = FAMILIES[family]
    model = build_model(seed=1, attn=attn)
    model.make_batch = lambda *args, **kwargs: build_batch(model, *args, **kwargs)
    return model


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch_size,images", [(1, 1), (1, 2), (3, 1), (3, 2)])
def test_fast_path_matches_reference(model, mode, batch_size, images):
    batch = model.make_batch(batch_size, images, seed=10 * batch_size + images)
    plan = EfficiencyPlan.from_layers(4, {0: mode, 2: mode, 3: "frozen"})
    with plan.applied(model, "reference"):
        reference = _logits(model, batch)
    with plan.applied(model):
        fast = _logits(model, batch)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(fast[valid], reference[valid], rtol=1e-5, atol=1e-5)
    assert (fast[valid] - _logits(model, batch)[valid]).abs().max() > 1e-3  # the plan changed something


@pytest.mark.parametrize("padding", ["left", "right"])
def test_empty_plan_is_exact_and_undo_restores(model, padding):
    batch = model.make_batch(3, 2, seed=5, padding=padding)
    original = _logits(model, batch)
    with EfficiencyPlan.uniform(model, "full").applied(model):
        assert torch.equal(_logits(model, batch), original)
    handle = apply_plan(model, EfficiencyPlan.uniform(model, "composite"))
    assert not torch.equal(_logits(model, batch), original)
    handle.remove()
    assert torch.equal(_logits(model, batch), original)
    assert not hasattr(model.config, "eemllm_plan")


def test_frozen_layer_keeps_visual_rows_and_matches_text_rows(model):
    batch = model.make_batch(3, 2, seed=7)
    layer = family_of(model).decoder_layers(model)[1]
    captured = {}

    def keep(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, dict(kwargs)

    hook = layer.register_forward_pre_hook(keep, with_kwargs=True)
    _logits(model, batch)
    hook.remove()
    hidden = captured["args"][0]
    kwargs = {k: v for k, v in captured["kwargs"].items() if k not in ("past_key_values", "cache")}  # KV cache
    layout = token_layout(model, batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        full = layer(hidden, **kwargs)
        frozen = fast_forward(layer, "frozen", layout, RowSplit.from_layout(layout), hidden, **kwargs)
    assert torch.equal(frozen[layout.visual], hidden[layout.visual])
    assert (~layout.valid).any() and torch.equal(frozen[~layout.valid], hidden[~layout.valid])  # padding passed on
    torch.testing.assert_close(frozen[layout.text], full[layout.text], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_generate_with_cache_equals_recomputing(model, mode):
    batch = model.make_batch(3, 1, seed=3)
    words_only = {"suppress_tokens": list(range(FIRST_WORD)), "max_new_tokens": 6, "do_sample": False}
    with EfficiencyPlan.from_layers(4, [0, 1, 3], mode).applied(model):
        cached = model.generate(**batch, **words_only, use_cache=True)
        recomputed = model.generate(**batch, **words_only, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_plan_for_other_layer_count_is_a_clear_error(model):
    with pytest.raises(ValueError, match=f"plan has 32 layers but {type(model).__name__} has 4"):
        apply_plan(model, EfficiencyPlan.preset("shortv:llava-1.5-7b"))


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown layer mode\(s\) \['fast'\]; choose from"):
        EfficiencyPlan(("full", "fast"))


def test_model_family_without_adapter_is_a_clear_error():
    from transformers import LlamaConfig, LlamaForCausalLM

    text_only = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=2, num_attention_heads=2))
    with pytest.raises(ValueError, match="no eemllm adapter for model type 'llama'"):
        EfficiencyPlan.uniform(text_only, "frozen")


def test_input_without_image_tokens_is_a_logged_no_op(model, caplog):
    ids = torch.randint(FIRST_WORD, 64, (2, 9))
    original = model(input_ids=ids).logits
    with caplog.at_level(logging.INFO, logger="eemllm_models.apply"):
        with EfficiencyPlan.uniform(model, "frozen").applied(model):
            assert torch.equal(model(input_ids=ids).logits, original)
    assert "no image tokens" in caplog.text


def test_image_features_not_matching_image_tokens_is_an_error(model):
    batch = model.make_batch(1, 1)
    batch["input_ids"][0, batch["input_ids"][0] == IMAGE_TOKEN] = 5
    batch["input_ids"][0, -3:] = IMAGE_TOKEN
    with EfficiencyPlan.uniform(model, "frozen").applied(model):
        with pytest.raises(ValueError, match="(?i)image features and image tokens do not match"):
            model(**batch)


def test_applying_twice_is_a_clear_error(model):
    with EfficiencyPlan.uniform(model, "frozen").applied(model):
        with pytest.raises(ValueError, match="already applied"):
            apply_plan(model, EfficiencyPlan.uniform(model, "naavit"))


def test_save_and_load_pruned_gives_identical_logits(model, tmp_path):
    from eemllm_models import load_pruned, save_pruned

    plan = EfficiencyPlan.from_layers(4, {1: "frozen", 2: "naavit", 3: "composite"}, policy="test")
    batch = model.make_batch(3, 2, seed=11)
    with plan.applied(model):
        expected = _logits(model, batch)
    save_pruned(model, plan, tmp_path / "pruned")
    assert not hasattr(model.config, "eemllm_plan")
    loaded, loaded_plan = load_pruned(tmp_path / "pruned")
    loaded.set_attn_implementation(model.config._attn_implementation)
    assert loaded_plan == plan
    assert torch.equal(_logits(loaded, batch), expected)
    plain = type(model).from_pretrained(tmp_path / "pruned").eval()
    plain.set_attn_implementation(model.config._attn_implementation)
    torch.testing.assert_close(_logits(plain, batch), _logits(model, batch))


def test_save_pruned_never_half_overwrites(model, tmp_path):
    from eemllm_models import save_pruned
    from eemllm_models.files import ForeignFolderError

    target = tmp_path / "pruned"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    plan = EfficiencyPlan.uniform(model, "frozen")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pruned(model, plan, target)
    with pytest.raises(ForeignFolderError, match="not written by eemllm"):  # a folder eemllm did not write
        save_pruned(model, plan, target, overwrite=True)
    assert [p.name for p in target.iterdir()] == ["keep.txt"] and (target / "keep.txt").read_text() == "mine"
    ours = tmp_path / "ours"
    save_pruned(model, plan, ours)
    config = (ours / "config.json").read_text()
    with pytest.raises(ValueError, match="plan has 3 layers"):
        save_pruned(model, EfficiencyPlan.uniform(3, "frozen"), ours, overwrite=True)
    assert (ours / "config.json").read_text() == config
    save_pruned(model, EfficiencyPlan.empty(plan.n_layers), ours, overwrite=True)
    assert (ours / "config.json").read_text() != config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "pruned"]
