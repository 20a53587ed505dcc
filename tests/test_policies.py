import numpy as np
import pytest
import xarray as xr
from transformers import LlamaConfig

from analyses.measuring.flops import TokenCounts, flops_ratio
from eemllm_models import EfficiencyPlan
from analyses.choosing.policies import (
    budget_plan,
    change_candidates,
    freeze_plan,
    greedy_plan,
    layer_ranking,
    shortv_within_tolerance,
)


def _lc_result(visual_lc, cosine) -> xr.Dataset:
    n = len(visual_lc)
    lc = np.stack([np.array(visual_lc), np.ones(n)], axis=-1)[None].repeat(2, axis=0)
    cos = np.stack([np.array(cosine), np.zeros(n)], axis=-1)[None].repeat(2, axis=0)
    dims = ("sample", "layer", "group")
    return xr.Dataset({"lc": (dims, lc), "cosine": (dims, cos)},
                      coords={"sample": ["a", "b"], "layer": range(n), "group": ["visual", "text"]},
                      attrs={"probe": "layer_contribution", "model": "m", "dataset": "d", "samples": 2, "seed": 0,
                             "divergence": "kl"})


def test_shortv_freezes_the_lowest_visual_lc_layers():
    lc = _lc_result([0.5, 0.01, 0.3, 0.0], [0.1, 0.2, 0.9, 0.8])
    plan = freeze_plan(lc, 2)
    assert plan.modes == ["full", "frozen", "full", "frozen"]
    assert plan.provenance["policy"] == "shortv" and plan.provenance["ranking"] == [3, 1, 2, 0]
    assert plan.provenance["probe_model"] == "m"
    assert freeze_plan(lc, 2, "cosine").layers("frozen") == (2, 3)


def test_random_policy_is_seeded():
    lc = _lc_result([0.5, 0.01, 0.3, 0.0, 0.2, 0.1], [0.0] * 6)
    assert freeze_plan(lc, 3, "random", seed=4).modes == freeze_plan(lc, 3, "random", seed=4).modes
    assert sorted(layer_ranking(lc, "random", seed=1)) == list(range(6))


def test_policy_errors_name_the_fix():
    lc = _lc_result([0.5, 0.01], [0.1, 0.2])
    with pytest.raises(ValueError, match="k must be between 0 and the model's 2 layers"):
        freeze_plan(lc, 3)
    with pytest.raises(ValueError, match="unknown policy 'fastv'"):
        freeze_plan(lc, 1, "fastv")
    with pytest.raises(ValueError, match="need a layer_contribution result"):
        freeze_plan(lc.assign_attrs(probe="attention_statistics"), 1)


def _mode_result(contribution) -> xr.Dataset:
    values = np.array(contribution, dtype=float)[None].repeat(2, axis=0)
    return xr.Dataset({"contribution": (("sample", "layer", "mode"), values)},
                      coords={"sample": ["a", "b"], "layer": range(values.shape[1]),
                              "mode": ["frozen", "naavit", "composite"]},
                      attrs={"probe": "mode_contribution", "model": "m", "divergence": "kl"})


CONFIG = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2)
TOKENS = TokenCounts(text_before=5, visual=100, text_after=20)


def test_budget_reaches_the_target_cheapest_loss_first():
    modes = _mode_result([[0.5, 0.1, 0.6], [0.01, 0.001, 0.02], [0.3, 0.2, 0.4], [0.02, 0.01, 0.03]])
    plan = budget_plan(modes, CONFIG, TOKENS, target=0.6)
    assert flops_ratio(CONFIG, plan, TOKENS) <= 0.6
    assert plan.modes[1] != "full" and plan.modes[3] != "full" and plan.modes[0] == "full"
    assert plan.provenance["policy"] == "budget" and plan.provenance["probe_model"] == "m"
    assert budget_plan(modes, CONFIG, TOKENS, target=1.0).is_empty
    with pytest.raises(ValueError, match="no mix of modes reaches 1%"):
        budget_plan(modes, CONFIG, TOKENS, target=0.01)
    with pytest.raises(ValueError, match="need a mode_contribution result"):
        budget_plan(_lc_result([0.1] * 4, [0.0] * 4), CONFIG, TOKENS, target=0.5)


def test_candidates_rank_by_loss_per_saved_flop():
    frame = change_candidates(_mode_result([[0.1, 0.1, 0.1]] * 4), CONFIG, TOKENS)
    assert len(frame) == 12 and frame.cost.is_monotonic_increasing
    # equal loss: the mode saving most FLOPs comes first
    assert frame["mode"].iloc[0] == frame.loc[frame.saved_flops.idxmax(), "mode"]


def test_greedy_keeps_only_changes_within_tolerance():
    modes = _mode_result([[0.01, 0.02, 0.03]] * 4)

    def accuracy(plan):  # frozen layers cost 10 points each, other modes nothing
        return 0.9 - 0.1 * len(plan.layers("frozen"))

    plan = greedy_plan(modes, CONFIG, TOKENS, accuracy, tolerance=0.05)
    assert "frozen" not in plan.modes and "full" not in plan.modes
    assert plan.provenance["baseline_accuracy"] == 0.9
    assert any(not t["kept"] for t in plan.provenance["trials"])


def test_shortv_k_by_tolerance_is_the_largest_within_it():
    lc = _lc_result([0.5, 0.01, 0.3, 0.0], [0.1, 0.2, 0.9, 0.8])
    plan = shortv_within_tolerance(lc, lambda p: 0.9 - (0.2 if 0 in p.layers("frozen") else 0.0), tolerance=0.05)
    assert plan.layers("frozen") == (1, 2, 3)
    assert set(plan.provenance["accuracy_by_k"]) == {"0", "1", "2", "3", "4"}


def test_greedy_stops_at_the_flops_target_and_records_it():
    modes = _mode_result([[0.01, 0.02, 0.03]] * 4)
    free = greedy_plan(modes, CONFIG, TOKENS, lambda plan: 0.9, tolerance=0.0)
    stopped = greedy_plan(modes, CONFIG, TOKENS, lambda plan: 0.9, tolerance=0.0, target=0.8)
    assert flops_ratio(CONFIG, free, TOKENS) < flops_ratio(CONFIG, stopped, TOKENS) <= 0.8
    assert len(stopped.provenance["trials"]) < len(free.provenance["trials"])
    # one change fewer would not reach the target: greedy stopped as soon as it got there
    last = stopped.provenance["trials"][-1]
    before = EfficiencyPlan.from_layers(4, {i: m for i, m in enumerate(stopped.modes) if m != "full" and i != last["layer"]})
    assert flops_ratio(CONFIG, before, TOKENS) > 0.8
    assert stopped.provenance["target"] == 0.8 and stopped.provenance["reached_target"] is True
    unreachable = greedy_plan(modes, CONFIG, TOKENS, lambda plan: 0.9 - 0.2 * (not plan.is_empty), tolerance=0.05,
                              target=0.5)
    assert unreachable.is_empty and unreachable.provenance["reached_target"] is False
    with pytest.raises(ValueError, match="share of the original"):
        greedy_plan(modes, CONFIG, TOKENS, lambda plan: 0.9, target=1.5)


def test_choosing_policies_record_flops_convention_tokens_and_the_selection_set():
    modes = _mode_result([[0.01, 0.02, 0.03]] * 4)
    plan = greedy_plan(modes, CONFIG, TOKENS, lambda plan: 0.9, tolerance=0.0, target=0.8)
    provenance = plan.provenance
    assert provenance["flops_convention"] == "shortv"
    assert provenance["flops_ratio"] == pytest.approx(flops_ratio(CONFIG, plan, TOKENS))
    assert TokenCounts.from_dict(provenance["tokens"]) == TOKENS
    assert provenance["accuracy"] == 0.9 and "selection" not in provenance  # a bare callable names no set
    budget = budget_plan(modes, CONFIG, TOKENS, target=0.6)
    assert budget.provenance["flops_ratio"] == pytest.approx(flops_ratio(CONFIG, budget, TOKENS))
    assert budget.provenance["prefill_flops_convention"] == "full"


def test_tolerance_k_records_the_accuracy_it_reached():
    lc = _lc_result([0.5, 0.01, 0.3, 0.0], [0.1, 0.2, 0.9, 0.8])
    plan = shortv_within_tolerance(lc, lambda p: 0.9 - (0.2 if 0 in p.layers("frozen") else 0.01 * len(p.layers("frozen"))),
                                   tolerance=0.05)
    assert plan.provenance["accuracy"] == pytest.approx(0.87) and plan.provenance["baseline_accuracy"] == 0.9
