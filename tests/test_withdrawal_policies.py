"""VTW's withdraw_plan, FastV's prune_tokens_plan and the budget policy mixing withdrawal with layer modes."""

import numpy as np
import pytest
import torch
import xarray as xr

import probes
from analyses.choosing.policies import (
    budget_plan,
    prune_tokens_plan,
    withdraw_plan,
    withdrawal_candidates,
)
from analyses.measuring.flops import (
    TokenCounts,
    flops_figures,
    flops_ratio,
    load_config,
)
from eemllm_models import EfficiencyPlan, build_prompt, load_shapes_vqa
from eemllm_models.zoo import build
from probes.uncertainty import with_intervals
from test_policies import CONFIG, TOKENS, _mode_result


def _result(contribution) -> xr.Dataset:
    """A withdrawal_contribution result of a model with ``len(contribution) + 1`` layers (two samples)."""
    values = np.array(contribution)[None].repeat(2, axis=0) + np.array([[-0.001], [0.001]])
    result = xr.Dataset({"withdrawal_contribution": (("sample", "layer"), values)},
                        coords={"sample": ["a", "b"], "layer": range(1, len(contribution) + 1)},
                        attrs={"probe": "withdrawal_contribution", "model": "m", "dataset": "d", "samples": 2,
                               "seed": 0, "divergence": "kl", "n_layers": len(contribution) + 1})
    return with_intervals(result, "withdrawal_contribution")


def test_withdraw_from_the_earliest_layer_that_stays_under_the_tolerance():
    result = _result([2.0, 0.8, 0.05, 0.3, 0.04, 0.02, 0.0])  # layer 3 dips under 0.1, layer 4 rises again
    plan = withdraw_plan(result, tolerance=0.1)
    assert plan == EfficiencyPlan.withdraw(8, 5).with_provenance(**plan.provenance)
    assert plan.provenance["policy"] == "withdraw" and plan.provenance["from_layer"] == 5
    assert plan.provenance["contribution"] == pytest.approx(0.04) and plan.provenance["probe_model"] == "m"
    assert withdraw_plan(result, tolerance=0.5).provenance["from_layer"] == 3
    assert withdraw_plan(result, tolerance=0.0405, upper=True).provenance["from_layer"] == 6  # the interval's top
    with pytest.raises(ValueError, match="no layer's withdrawal contribution stays under 0.0 nats.*raise the"):
        withdraw_plan(_result([0.5, 0.2]), tolerance=0.0)
    with pytest.raises(ValueError, match="needs a withdrawal_contribution result"):
        withdraw_plan(result.assign_attrs(probe="layer_contribution"), tolerance=0.1)


def test_withdraw_and_prune_plans_record_their_flops():
    config = load_config("llava-1.5-7b")
    tokens = TokenCounts(0, 576, 64)
    plan = withdraw_plan(_result(list(np.linspace(1.0, 0.0, 31))), 0.5, config=config, tokens=tokens)
    assert plan.provenance["from_layer"] == 16 and plan.visual_keep == [1.0] * 16 + [0.0] * 16
    assert plan.provenance["flops_ratio"] == flops_figures(config, plan, tokens)["decoder_flops_ratio"] < 0.6
    fastv = prune_tokens_plan(32, 2, 0.5, config=config, tokens=tokens)
    assert fastv.visual_keep == [1.0, 1.0] + [0.5] * 30 and fastv.visual_ranking == "attention"
    assert fastv.provenance["policy"] == "fastv" and fastv.provenance["prefill_flops_ratio"] < 0.7
    assert prune_tokens_plan(32, 3, 0.25, ranking="stride").visual_ranking == "stride"
    with pytest.raises(ValueError, match=r"keep is the share of visual tokens kept, in \[0, 1\)"):
        prune_tokens_plan(32, 2, 1.0)
    with pytest.raises(ValueError, match="pass both config and tokens"):
        prune_tokens_plan(32, 2, 0.5, config=config)


def test_withdraw_plan_from_a_measured_result_runs_on_the_model():
    model, processor = build.build_untrained(0)
    model.eval()
    data = load_shapes_vqa("train", n=6)
    result = probes.withdrawal_contribution(model, processor, data, samples=4, batch_size=4)
    mean = result.withdrawal_contribution.mean("sample")
    tolerance = float(mean.max()) + 1e-9  # every layer qualifies: withdraw from layer 1
    plan = withdraw_plan(result, tolerance)
    assert plan.provenance["from_layer"] == 1 and plan.n_layers == 12
    batch = processor(images=[data[0]["image"]], text=[build_prompt(processor, data[0]["question"])],
                      return_tensors="pt")
    with torch.no_grad(), plan.applied(model):
        assert model(**batch).logits.isfinite().all()


def test_budget_mixes_withdrawal_with_layer_modes_cheapest_loss_first():
    modes = _mode_result([[0.5, 0.1, 0.6], [0.01, 0.001, 0.02], [0.3, 0.2, 0.4], [0.02, 0.01, 0.03]])
    cheap = _result([5.0, 1e-4, 1e-5])  # withdrawing from layer 2 costs almost nothing
    plan = budget_plan(modes, CONFIG, TOKENS, target=0.5, withdrawal=cheap)
    assert plan.visual_keep == [1, 1, 0, 0] and plan.provenance["withdrawn_from"] == 2
    assert plan.modes[2:] == ["full", "full"] and plan.modes[1] != "full"  # layer 1's cheap mode joins it
    assert flops_ratio(CONFIG, plan, TOKENS) <= 0.5 == plan.provenance["target"]
    costly = _result([5.0, 4.0, 3.0])
    assert budget_plan(modes, CONFIG, TOKENS, 0.6, withdrawal=costly).modes == budget_plan(modes, CONFIG, TOKENS,
                                                                                           0.6).modes
    assert not budget_plan(modes, CONFIG, TOKENS, 0.6, withdrawal=costly).withdraws
    candidates = withdrawal_candidates(cheap, CONFIG, TOKENS)
    assert candidates.layer.tolist() == [1, 2, 3] and candidates.saved_flops.is_monotonic_decreasing
    with pytest.raises(ValueError, match="divergence 'js' but the mode contributions 'kl'"):
        budget_plan(modes, CONFIG, TOKENS, 0.5, withdrawal=cheap.assign_attrs(divergence="js"))
    with pytest.raises(ValueError, match="of a 3-layer model but the config has 4 layers"):
        withdrawal_candidates(_result([0.1, 0.2]), CONFIG, TOKENS)


def test_the_comparison_benchmark_puts_every_method_side_by_side_at_the_target():
    from analyses.measuring.bench_withdrawal import compare

    table = compare(probe_samples=4, test_rows=14, latency_prompts=2, new_tokens=4, repeats=1).set_index("method")
    assert list(table.index) == ["original", "shortv", "naavit", "composite", "vtw", "fastv", "budget"]
    reached = table.drop(index=["original", "naavit", "composite"])  # those two save too little to reach 0.5
    assert (reached.flops_ratio <= 0.5).all()
    assert (table.n == 14).all() and (table.accuracy_low <= table.accuracy).all()
    assert table.kv_cache_bytes["vtw"] < table.kv_cache_bytes["original"]
    planned = table.drop(index="original")
    assert planned.difference.between(planned.difference_low, planned.difference_high).all()


def test_a_methods_plan_is_labelled_by_runs_of_layers():
    from analyses.choosing.methods import describe, layer_ranges

    assert layer_ranges([9, 2, 3, 4, 5, 7, 10]) == "2-5, 7, 9-10" and layer_ranges([]) == ""
    plan = EfficiencyPlan.from_layers(12, [3, 4, 5, 9], "frozen").with_visual_keep([1.0] * 10 + [0.0, 0.0])
    assert describe(plan) == "frozen 3-5, 9; keep 0 from layer 10"
    assert describe(EfficiencyPlan.empty(12)) == "nothing"


def test_minus_zero_keeps_none_like_zero():
    from analyses.choosing.methods import describe

    plan = EfficiencyPlan.prune_tokens(8, 2, -0.0)
    assert plan == EfficiencyPlan.prune_tokens(8, 2, 0.0) and describe(plan) == "keep 0 from layer 2"
