"""Fast paths against the references: frozen runs, hooks, hidden states, caches, exceptions, kernels."""

import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from eemllm_models import EfficiencyPlan, apply_plan
from eemllm_models.apply import choose_naavit_kernel
from eemllm_models.families import family_of
from eemllm_models.modes import flex_available
from tiny_models import FAMILIES, FIRST_WORD

PLANS = {
    "one_run": ["frozen"] * 4,
    "two_runs": ["frozen", "frozen", "full", "frozen"],
    "mixed": ["frozen", "naavit", "frozen", "frozen"],
    "mixed2": ["composite", "frozen", "frozen", "naavit"],
}
ATOL = 1e-5
# bf16 on CUDA: fast and reference round differently (op order, fused kernels); logits of the tiny
# random models (|logit| < 1) agree to this absolute tolerance.
BF16_ATOL = 3e-2


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request):
    build_model, build_batch = FAMILIES[request.param]
    model = build_model(seed=2)
    model.make_batch = lambda *args, **kwargs: build_batch(model, *args, **kwargs)
    return model


def _layers(model):
    return family_of(model).decoder_layers(model)


def _run(model, batch, plan, implementation="fast", naavit_kernel="auto", **call_kwargs):
    """The model's output on ``batch`` with ``plan`` applied."""
    with torch.no_grad(), apply_plan(model, plan, implementation, naavit_kernel):
        return model(**batch, **call_kwargs)


def _assert_close_on_valid(fast, reference, batch, atol=ATOL):
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(fast[valid], reference[valid], rtol=atol, atol=atol)


class _HiddenCopies(TorchDispatchMode):
    """Counts copies (``aten.clone``) of tensors shaped like the decoder's hidden states."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.clone.default and tuple(out.shape) == self.shape:
            self.count += 1
        return out


def _runs(model, modes) -> int:
    """Frozen runs a plan makes: consecutive frozen layers, cut where the model adds to the hidden
    states between two layers (Qwen3-VL's deepstack features, after its first layers)."""
    vision = getattr(model.config, "vision_config", None)
    added_after = set(range(len(getattr(vision, "deepstack_visual_indexes", None) or [])))
    return sum(1 for layer, mode in enumerate(modes)
               if mode == "frozen" and (layer == 0 or modes[layer - 1] != "frozen" or layer - 1 in added_after))


def _copies(model, batch, plan, **call_kwargs):
    """Copies of the hidden states the plan makes: beyond those the model makes itself (Qwen3-VL's
    deepstack additions clone them between its first layers)."""
    shape = (*batch["input_ids"].shape, model.config.get_text_config().hidden_size)
    with _HiddenCopies(shape) as own:
        _run(model, batch, EfficiencyPlan.empty(len(_layers(model))), **call_kwargs)
    with _HiddenCopies(shape) as counter:
        out = _run(model, batch, plan, **call_kwargs)
    return counter.count - own.count, out


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("plan", PLANS)
def test_fast_matches_reference_on_fresh_inputs(model, plan, padding):
    batch = model.make_batch(3, 2, seed=len(plan) + len(padding), padding=padding)
    plan = EfficiencyPlan(PLANS[plan])
    fast = _run(model, batch, plan).logits
    reference = _run(model, batch, plan, "reference").logits
    _assert_close_on_valid(fast, reference, batch)


def test_frozen_run_copies_hidden_states_once_per_run(model):
    batch = model.make_batch(2, 1, seed=4)
    for name in ("one_run", "two_runs"):
        assert _copies(model, batch, EfficiencyPlan(PLANS[name]))[0] == _runs(model, PLANS[name])


def test_hidden_states_output_is_correct_and_runs_resume_after(model):
    batch = model.make_batch(2, 2, seed=5)
    plan = EfficiencyPlan(PLANS["one_run"])
    copies, fast = _copies(model, batch, plan, output_hidden_states=True)
    reference = _run(model, batch, plan, "reference", output_hidden_states=True)
    assert copies == 4  # every layer's output is kept, so none is reused
    assert len(fast.hidden_states) == len(reference.hidden_states) == 5
    for ours, theirs in zip(fast.hidden_states, reference.hidden_states):
        _assert_close_on_valid(ours, theirs, batch)
    assert _copies(model, batch, plan)[0] == _runs(model, plan.modes)  # idle capture hooks do not stop later runs


def test_hooks_inside_a_run_see_what_the_reference_shows(model):
    batch = model.make_batch(2, 1, seed=6)
    plan = EfficiencyPlan(PLANS["one_run"])
    layers = _layers(model)
    seen = {}
    handles = [layers[1].register_forward_hook(lambda m, a, out: seen.__setitem__("out1", out.clone())),
               layers[2].register_forward_pre_hook(lambda m, a: seen.update(in2=a[0], in2_then=a[0].clone())),
               layers[2].register_forward_hook(lambda m, a, out: out * 1.5)]
    try:
        logits, expected = {}, {}
        for implementation in ("reference", "fast"):
            logits[implementation] = _run(model, batch, plan, implementation).logits
            expected[implementation] = dict(seen)
    finally:
        for handle in handles:
            handle.remove()
    _assert_close_on_valid(logits["fast"], logits["reference"], batch)
    for key in ("out1", "in2"):
        _assert_close_on_valid(expected["fast"][key], expected["reference"][key], batch)
    torch.testing.assert_close(seen["in2"], seen["in2_then"])  # layer 2 did not write into the input a hook kept


def test_hook_changing_a_layer_output_in_place_is_honoured(model):
    batch = model.make_batch(2, 1, seed=7)
    plan = EfficiencyPlan(PLANS["one_run"])
    handle = _layers(model)[1].register_forward_hook(lambda m, a, out: out.mul_(0.5))
    try:
        fast = _run(model, batch, plan).logits
        reference = _run(model, batch, plan, "reference").logits
    finally:
        handle.remove()
    _assert_close_on_valid(fast, reference, batch)


def test_exception_inside_a_run_leaves_nothing_behind(model):
    batch = model.make_batch(2, 1, seed=8)
    plan = EfficiencyPlan(PLANS["one_run"])

    def fail(module, args, output):
        raise RuntimeError("probe failed")

    handle = apply_plan(model, plan)
    hook = _layers(model)[2].register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="probe failed"), torch.no_grad():
            model(**batch)
        assert handle._state.cache is None
    finally:
        hook.remove()
        handle.remove()
    _assert_close_on_valid(_run(model, batch, plan).logits, _run(model, batch, plan, "reference").logits, batch)


@pytest.mark.parametrize("plan", ["two_runs", "mixed2"])
def test_generate_fast_equals_reference(model, plan):
    batch = model.make_batch(2, 1, seed=9)
    words_only = {"suppress_tokens": list(range(FIRST_WORD)), "max_new_tokens": 5, "do_sample": False}
    outputs = {}
    for implementation in ("fast", "reference"):
        with apply_plan(model, EfficiencyPlan(PLANS[plan]), implementation), torch.no_grad():
            outputs[implementation] = model.generate(**batch, **words_only)
    assert torch.equal(outputs["fast"], outputs["reference"])


def test_gradients_through_a_frozen_run_match_the_reference(model):
    batch = model.make_batch(2, 1, seed=10)
    weight = _layers(model)[1].self_attn.k_proj.weight
    grads = []
    for implementation in ("fast", "reference"):
        model.zero_grad()
        with apply_plan(model, EfficiencyPlan(PLANS["one_run"]), implementation):
            model(**batch).logits[batch["attention_mask"].bool()].square().sum().backward()
        grads.append(weight.grad.clone())
    model.zero_grad()
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not flex_available(), reason="this torch has no FlexAttention")
@pytest.mark.parametrize("padding", ["left", "right"])
def test_flex_naavit_matches_reference(model, padding):
    batch = model.make_batch(3, 2, seed=11, padding=padding)
    plan = EfficiencyPlan(["naavit", "frozen", "naavit", "naavit"])
    fast = _run(model, batch, plan, naavit_kernel="flex_eager").logits
    _assert_close_on_valid(fast, _run(model, batch, plan, "reference").logits, batch)


@pytest.mark.slow
@pytest.mark.skipif(not flex_available(), reason="this torch has no FlexAttention")
def test_compiled_flex_naavit_matches_reference_on_cpu():
    build_model, build_batch = FAMILIES["llava_next"]
    model = build_model(seed=3)
    batch = build_batch(model, 2, 2, seed=12)
    plan = EfficiencyPlan.uniform(model, "naavit")
    fast = _run(model, batch, plan, naavit_kernel="flex").logits
    _assert_close_on_valid(fast, _run(model, batch, plan, "reference").logits, batch)


def test_apply_logs_which_path_runs_once(model, caplog):
    batch = model.make_batch(1, 1, seed=13)
    with caplog.at_level(logging.INFO, logger="eemllm_models.apply"):
        with apply_plan(model, EfficiencyPlan(PLANS["mixed2"])):
            for _ in range(2):
                with torch.no_grad():
                    model(**batch)
    lines = [r.message for r in caplog.records if "fast implementation" in r.message]
    assert len(lines) == 1
    assert "1 naavit" in lines[0] and "gathered non-visual keys" in lines[0] and "share one copy" in lines[0]


def test_naavit_kernel_choice(model):
    assert choose_naavit_kernel(model) == "gather"  # CPU: the gather kernel is the faster one here
    assert choose_naavit_kernel(model, "flex_eager") == "flex_eager"
    with pytest.raises(ValueError, match="naavit_kernel must be 'auto' or one of"):
        choose_naavit_kernel(model, "flash")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("plan", ["mixed", "mixed2"])
def test_cuda_bf16_fast_paths_match_reference(plan):
    build_model, build_batch = FAMILIES["llava"]
    model = build_model(seed=4).to("cuda", torch.bfloat16)
    batch = {k: v.to("cuda") for k, v in build_batch(model, 3, 2, seed=14).items()}
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    plan = EfficiencyPlan(PLANS[plan])
    assert choose_naavit_kernel(model) == "flex"
    fast = _run(model, batch, plan).logits.float()
    reference = _run(model, batch, plan, "reference").logits.float()
    _assert_close_on_valid(fast, reference, batch, atol=BF16_ATOL)


def test_block_masks_are_reused_for_a_repeated_layout():
    from eemllm_models.layout import TokenLayout
    from eemllm_models.modes import NaavitBlockMasks, allowed_keys

    ids = torch.tensor([[1, 2, 3, 3, 3, 4, 5]])
    masks = NaavitBlockMasks(size=1)
    first = masks.get(TokenLayout.from_input_ids(ids, [3]), allowed_keys(None, 1, 7, 7, ids.device))
    again = masks.get(TokenLayout.from_input_ids(ids.clone(), [3]), allowed_keys(None, 1, 7, 7, ids.device))
    assert again is first
    other = masks.get(TokenLayout.from_input_ids(ids, [4]), allowed_keys(None, 1, 7, 7, ids.device))
    assert other is not first


def test_bench_scales_paper_configs_and_presets():
    from analyses.measuring.bench_modes import paper_prompt, scaled_llava_config, scaled_preset

    assert scaled_preset("shortv:llava-1.5-7b", 32) == EfficiencyPlan.preset("shortv:llava-1.5-7b")
    shallow = scaled_preset("shortv:llava-1.5-7b", 8)
    assert shallow.n_layers == 8 and len(shallow.layers("frozen")) == 5  # round(19 * 8 / 32)
    text = scaled_llava_config("llava-1.5-7b", 0.25, 4).text_config
    assert (text.hidden_size, text.num_attention_heads, text.head_dim, text.intermediate_size,
            text.num_hidden_layers) == (1024, 8, 128, 2752, 4)
    prompt = paper_prompt(images=4)
    assert int((prompt["input_ids"] == 32000).sum()) == 4 * 576
    assert prompt["input_ids"].shape[1] == 4 * 576 + 35 + 3 * 5 + 29 and prompt["pixel_values"].shape[0] == 4


def test_bench_runs_a_paper_config_and_writes_its_table(tmp_path, capsys):
    import json

    import pandas as pd

    from analyses.measuring.bench_modes import main

    main(["--config", "llava-next-7b", "--scale", "0.0625", "--layers", "2", "--repeats", "1", "--warmup", "0",
          "--out", str(tmp_path)])
    table = pd.read_csv(tmp_path / "bench_modes.csv")
    assert list(table.plan) == ["original", "empty", "shortv:llava-next-7b", "naavit", "composite", "vtw-middle"]
    assert (table.visual == 2880).all() and (table.layers == 2).all()
    assert table.flops_ratio.between(0, 1).all() and (table.median_ms > 0).all()
    assert json.loads((tmp_path / "bench_modes.json").read_text())["settings"]["config"] == "llava-next-7b"
    assert "shortv:llava-next-7b" in capsys.readouterr().out
    assert table.decode_ms.isna().all() and (table.new_tokens == 1).all()


def test_bench_times_decoding_with_the_withdrawn_cache(tmp_path):
    import pandas as pd

    from analyses.measuring.bench_modes import main

    main(["--config", "llava-next-7b", "--scale", "0.0625", "--layers", "2", "--repeats", "1", "--warmup", "0",
          "--new-tokens", "3", "--out", str(tmp_path)])
    table = pd.read_csv(tmp_path / "bench_modes.csv").set_index("plan")
    assert (table.decode_ms > 0).all() and (table.new_tokens == 3).all()
    # withdrawal from layer 1 of 2: layer 1's cache holds the 64 text positions and the 2 decoded ones only
    row_mb = table.loc["original", "kv_cache_mb"] / (2 * (2880 + 64 + 2))
    assert table.loc["vtw-middle", "kv_cache_mb"] == pytest.approx(row_mb * (2880 + 64 + 2 + 64 + 2))
    assert table.loc["empty", "kv_cache_mb"] == table.loc["original", "kv_cache_mb"]
