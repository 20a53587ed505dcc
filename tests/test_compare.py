import pandas as pd
import pytest
import torch

from analyses.choosing.compare import (POLICY_TABLE_COLUMNS, compare_policies, policy_table, random_seeds_label,
                                       text_frozen, text_frozen_flops_ratio)
from analyses.measuring.flops import TokenCounts, flops_ratio
from eemllm_models import EfficiencyPlan, load_shapes_vqa, token_layout
from eemllm_models.families import family_of
from probes.uncertainty import wilson_interval
from tiny_models import FAMILIES


def _layer_io(model, inputs, layer):
    seen = {}

    def keep(module, args, kwargs, output):
        seen["in"], seen["out"] = (args[0] if args else kwargs["hidden_states"]), output

    handle = family_of(model).decoder_layers(model)[layer].register_forward_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        handle.remove()
    return seen["in"], seen["out"], logits


def test_text_frozen_puts_back_text_rows_only_and_restores_the_model():
    build_model, build_batch = FAMILIES["llava"]
    model = build_model(seed=1)
    inputs = build_batch(model, 2, 2, seed=2, padding="left")
    visual = token_layout(model, inputs["input_ids"]).visual[..., None]
    _, original_out, original_logits = _layer_io(model, inputs, 1)
    with text_frozen(model, [1]):
        hidden_in, out, _ = _layer_io(model, inputs, 1)
    torch.testing.assert_close(torch.where(visual, original_out, hidden_in), out)
    assert not torch.equal(out, original_out)
    torch.testing.assert_close(_layer_io(model, inputs, 1)[2], original_logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="outside 0..3"):
        with text_frozen(model, [4]):
            pass


def test_text_frozen_flops_swap_the_roles_of_text_and_visual():
    model = FAMILIES["llava"][0](seed=1)
    balanced = TokenCounts(text_before=0, visual=40, text_after=40)
    frozen = flops_ratio(model.config, EfficiencyPlan.from_layers(4, [0, 2]), balanced)
    assert text_frozen_flops_ratio(model.config, [0, 2], balanced) == pytest.approx(frozen)
    few_text = TokenCounts(text_before=2, visual=100, text_after=10)
    assert text_frozen_flops_ratio(model.config, [0, 2], few_text) > 0.9


def test_compare_policies_measures_every_policy_at_every_k(default_model):
    import probes

    model, processor = default_model
    lc = probes.layer_contribution(model, processor, load_shapes_vqa("train", n=20), samples=2, progress=False)
    tokens = TokenCounts(5, 100, 30)
    frame = compare_policies(model, processor, load_shapes_vqa("validation", n=4), lc, ks=[2, 4], tokens=tokens,
                             seeds=(0, 1), progress=False, evaluation=load_shapes_vqa("test", n=4))
    assert list(frame.columns) == ["policy", "k", "seed", "layers", "flops_ratio", "accuracy", "correct", "outcomes",
                                   "split", "n"]
    assert (frame.outcomes.str.len() == 4).all() and (frame.outcomes.map(lambda t: t.count("+")) == frame.correct).all()
    assert (frame.correct / frame.n == frame.accuracy).all()
    assert set(frame.split) == {"validation"} and set(frame.n) == {4}
    assert len(frame) == 1 + 2 * (3 + 2)
    same_k = frame[(frame.k == 2) & (frame.policy != "text")]
    assert same_k.flops_ratio.nunique() == 1
    text = frame[frame.policy == "text"]
    assert (text.layers.values == frame[frame.policy == "shortv"].layers.values).all()
    assert frame.accuracy.between(0, 1).all()
    with pytest.raises(ValueError, match="unknown comparison"):
        compare_policies(model, processor, load_shapes_vqa("test", n=2), lc, [1], tokens, compared=["fastv"])


def test_compare_and_accuracy_refuse_a_selection_set_that_overlaps_the_evaluation_set(default_model):
    from analyses.choosing.compare import accuracy_on
    from analyses.choosing.heldout import HeldOutOverlap

    model, processor = default_model
    lc = _tiny_lc(model)
    test = load_shapes_vqa("test", n=6)
    with pytest.raises(HeldOutOverlap, match="share 4 rows by id"):
        compare_policies(model, processor, test.select(range(4)), lc, [1], TokenCounts(3, 100, 14), evaluation=test)
    with pytest.raises(ValueError, match="allow_overlap=True"):
        accuracy_on(model, processor, test, evaluation=test.select([5]))
    with pytest.warns(UserWarning, match="share 1 rows"):
        accuracy = accuracy_on(model, processor, test, evaluation=test.select([5]), allow_overlap=True)
    assert (accuracy.split, accuracy.n) == ("test", 6)


def _tiny_lc(model):
    import numpy as np
    import xarray as xr

    n = model.config.text_config.num_hidden_layers
    dims = ("sample", "layer", "group")
    return xr.Dataset({"lc": (dims, np.ones((1, n, 2))), "cosine": (dims, np.zeros((1, n, 2)))},
                      coords={"sample": ["a"], "layer": range(n), "group": ["visual", "text"]},
                      attrs={"probe": "layer_contribution"})


def _outcome_rows(outcomes: dict[tuple[str, int, int], str]) -> pd.DataFrame:
    return pd.DataFrame([{"policy": p, "k": k, "seed": s, "flops_ratio": 1 - 0.1 * k, "outcomes": o,
                          "accuracy": o.count("+") / len(o)} for (p, k, s), o in outcomes.items()])


def test_policy_table_gives_each_policy_its_n_and_an_interval_that_holds_its_accuracy():
    frame = _outcome_rows({("original", 0, 0): "++++++++-+", ("shortv", 2, 0): "+++++++--+",
                           ("random", 2, 0): "+-+-++--+-", ("random", 2, 1): "+--+++-++-"})
    table = policy_table(frame)
    assert list(table.columns) == list(POLICY_TABLE_COLUMNS)
    assert list(zip(table.k, table.policy, table.seeds)) == [(0, "original", 1), (2, "shortv", 1), (2, "random", 2)]
    assert table.n.tolist() == [10, 10, 10]
    assert table.accuracy.tolist() == pytest.approx([0.9, 0.8, 0.55])
    shortv = table.iloc[1]
    assert (shortv.low, shortv.high) == pytest.approx(wilson_interval(8, 10))
    assert shortv.method == "Wilson score"
    random = table.iloc[2]  # seeds disagree on questions: the mean over seeds is graded, so a bootstrap
    assert random.method.startswith("percentile bootstrap") and random.low < 0.55 < random.high
    assert table.flops_ratio.tolist() == pytest.approx([1.0, 0.8, 0.8])


def test_policy_table_refuses_a_comparison_without_outcomes():
    with pytest.raises(ValueError, match="no per-question 'outcomes' column; measure it with compare_policies"):
        policy_table(pd.DataFrame({"policy": ["shortv"], "k": [1], "accuracy": [0.5], "flops_ratio": [0.9]}))


def test_random_seeds_label_names_one_seed_or_counts_several():
    rows = pd.DataFrame({"policy": ["original", "shortv", "random", "random"], "seed": [0, 0, 4, 4]})
    assert random_seeds_label(rows) == "random: seed 4"
    assert random_seeds_label(rows.assign(seed=[0, 0, 1, 2])) == "random: mean of 2 seeds"
    assert random_seeds_label(rows[rows.policy != "random"]) == "random: not compared"
