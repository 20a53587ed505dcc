"""Latency measurement: the frame's shape and ratios, the timed decode loop against generate(), bad inputs.

Times are never asserted (the machine is shared); runs use few tokens and one repeat.
"""

import math

import pandas as pd
import pytest
import torch
from tiny_models import FAMILIES

from analyses.measuring.latency import NOISY_SPREAD, RAW_COLUMNS, SUMMARY_COLUMNS, greedy_decode, measure_latency
from eemllm_models import EfficiencyPlan, build_prompt, load_shapes_vqa

FROZEN = EfficiencyPlan.from_layers(12, [2, 6, 7, 8, 9, 10, 11], "frozen")


@pytest.fixture(scope="module")
def data():
    d = load_shapes_vqa("test", n=3)
    return list(d["image"]), list(d["question"])


def test_frame_has_one_row_per_variant_and_ratios_to_the_first(default_model, data, capsys):
    model, processor = default_model
    plans = {"original": None, "empty": EfficiencyPlan.empty(12), "frozen": FROZEN}
    frame = measure_latency(model, processor, *data, plans, new_tokens=3, warmup=1, repeats=2, batch_size=2)
    assert tuple(frame.columns) == SUMMARY_COLUMNS
    assert frame["variant"].tolist() == list(plans)
    assert (frame["prefill_ms"] > 0).all() and (frame["decode_tokens_per_s"] > 0).all()
    assert (frame[["prefill_ms_iqr", "decode_tokens_per_s_iqr"]] >= 0).all().all()
    assert frame.loc[0, "prefill_speedup"] == 1.0 and frame.loc[0, "decode_speedup"] == 1.0
    assert frame.loc[0, ["prefill_speedup_low", "prefill_speedup_high"]].tolist() == [1.0, 1.0]
    assert not frame.noisy[0] and frame.attrs["interval_level"] == 0.95
    for side in ("prefill", "decode"):
        assert (frame[f"{side}_speedup_low"] <= frame[f"{side}_speedup"]).all()
        assert (frame[f"{side}_speedup"] <= frame[f"{side}_speedup_high"]).all()
    spread = frame.prefill_ms_iqr / frame.prefill_ms
    expected = ((frame.prefill_speedup_low <= 1) & (frame.prefill_speedup_high >= 1)) | (spread > NOISY_SPREAD) | (
        spread[0] > NOISY_SPREAD)
    assert (frame.noisy[1:] == expected[1:]).all()
    assert frame["peak_memory_mb"].isna().all()  # CPU: no allocator statistics
    assert frame.loc[0, ["repeats", "batch", "new_tokens", "device", "dtype"]].tolist() == [2, 2, 3, "cpu",
                                                                                           "float32"]
    assert frame.loc[0, "prompt_tokens"] > 100  # 100 visual tokens plus the question
    raw = pd.DataFrame(frame.attrs["raw"])
    assert tuple(raw.columns) == RAW_COLUMNS and len(raw) == 2 * len(plans)
    assert raw.groupby("variant")["prefill_ms"].median().loc["frozen"] == frame.loc[2, "prefill_ms"]
    prefill = raw.pivot(index="repeat", columns="variant", values="prefill_ms")
    assert frame.loc[2, "prefill_speedup"] == pytest.approx((prefill["original"] / prefill["frozen"]).median())
    assert len(pd.concat([frame, frame])) == 6
    assert "latency" in capsys.readouterr().err  # the progress bar
    assert getattr(model, "_eemllm_applied", None) is None  # every plan removed


def test_greedy_decode_of_planned_default_model_equals_generate(default_model, data):
    model, processor = default_model
    images, questions = data
    batch = processor(images=images, text=[build_prompt(processor, q) for q in questions], return_tensors="pt",
                      padding=True, padding_side="left")
    assert not batch["attention_mask"].all()  # left padding is exercised
    with torch.inference_mode(), FROZEN.applied(model):
        mine = greedy_decode(model, batch, new_tokens=4)
        ref = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(mine, ref[:, batch["input_ids"].shape[1]:])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_decode_equals_generate_in_every_family(family):
    build, make_batch = FAMILIES[family]
    model = build()
    batch = make_batch(model, 2, 1)
    with torch.inference_mode():
        mine = greedy_decode(model, batch, new_tokens=4)
        ref = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(mine, ref[:, batch["input_ids"].shape[1]:])


@pytest.mark.parametrize("change, message", [
    ({"plans": {}}, "no variants"),
    ({"plans": {"original": "frozen"}}, "pass an EfficiencyPlan"),
    ({"plans": {"": None}}, "non-empty strings"),
    ({"plans": {"wrong": EfficiencyPlan.empty(4)}}, "make the plan for this model"),
    ({"questions": ["one?"]}, "one image per question"),
    ({"images": [], "questions": []}, "at least one image"),
    ({"repeats": 0}, "repeats must be at least 1"),
    ({"warmup": -1}, "warmup must be at least 0"),
    ({"new_tokens": 1}, "new_tokens must be at least 2"),
    ({"batch_size": 0}, "batch_size must be at least 1"),
])
def test_bad_inputs_are_named(default_model, data, change, message):
    model, processor = default_model
    args = {"images": data[0], "questions": data[1], "plans": {"original": None}, **change}
    with pytest.raises(ValueError, match=message):
        measure_latency(model, processor, progress=False, **args)


def test_a_model_with_a_plan_already_applied_is_refused(default_model, data):
    model, processor = default_model
    with FROZEN.applied(model), pytest.raises(ValueError, match="remove it first"):
        measure_latency(model, processor, *data, {"original": None}, progress=False)


def test_iqr_is_zero_for_one_repeat(default_model, data):
    model, processor = default_model
    frame = measure_latency(model, processor, data[0][:1], data[1][:1], {"original": None}, new_tokens=2,
                            warmup=0, repeats=1, progress=False)
    assert frame.loc[0, "prefill_ms_iqr"] == 0 and frame.loc[0, "batch"] == 1
    assert not math.isnan(frame.loc[0, "decode_tokens_per_s"])


def test_prompts_are_encoded_per_batch_and_batches_past_the_budget_again(default_model):
    from analyses.evaluating.benchmarks import shapes_vqa_ranges
    from analyses.measuring.latency import _Batches

    model, processor = default_model
    rows = shapes_vqa_ranges("test", n=5)
    kept = _Batches(model, processor, rows.column("image"), rows.column("question"), 2)
    again = _Batches(model, processor, rows.column("image"), rows.column("question"), 2, kept_bytes=0)
    for first, second in zip([list(kept), list(kept)], [list(again), list(again)]):
        assert len(first) == len(second) == 3
        for a, b in zip(first, second):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(kept.kept) == 3 and again.kept == [] and kept.prompt_tokens == again.prompt_tokens > 100
    frame = measure_latency(model, processor, rows.column("image"), rows.column("question"), {"original": None},
                            new_tokens=2, warmup=0, repeats=1, batch_size=2, progress=False)
    assert frame.loc[0, "prompt_tokens"] == kept.prompt_tokens and frame.attrs["prompts"] == 5


def test_a_steady_ratio_on_a_busy_machine_is_flagged_noisy():
    """The issue's case: every repeat says 0.76x, so the interval excludes 1.0, but the repeats spread widely."""
    from analyses.measuring.latency import _summarize

    original = [100.0, 130.0, 160.0, 100.0, 130.0]
    raw = pd.DataFrame([{"variant": v, "repeat": r, "prefill_ms": ms / (0.76 if v == "pruned" else 1.0),
                         "decode_ms": 10.0, "decode_tokens_per_s": 100.0, "peak_memory_mb": float("nan")}
                        for r, ms in enumerate(original) for v in ("original", "pruned")])
    summary = _summarize(raw, ["original", "pruned"]).set_index("variant")
    assert summary.prefill_speedup_high["pruned"] < 1.0 and summary.noisy["pruned"]
    steady = raw.assign(prefill_ms=raw.prefill_ms.where(raw.variant == "pruned", 130.0)
                        .where(raw.variant == "original", 130.0 / 0.76))
    assert not _summarize(steady, ["original", "pruned"]).set_index("variant").noisy["pruned"]
