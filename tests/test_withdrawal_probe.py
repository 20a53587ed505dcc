"""The withdrawal contribution probe (VTW's criterion) and FastV's ranking statistics."""

import pytest
import torch
import xarray as xr
from tiny_models import CORE_FAMILIES, FAMILIES

import probes
from eemllm_models import EfficiencyPlan, load_shapes_vqa, token_layout
from eemllm_models.zoo import build
from probes.contribution import trace
from probes.runner import PromptedBatch
from probes.withdrawal import ranking_statistics, reference_withdrawal, sweep_withdrawal


def _tiny(family: str, attn: str = "sdpa", answer_positions: bool = False):
    build_model, build_batch = FAMILIES[family]
    model = build_model(seed=3, attn=attn)
    inputs = build_batch(model, 3, 2, seed=4, padding="left")
    width = inputs["input_ids"].shape[1]
    if answer_positions:  # the last 1..3 positions, a different count per row
        positions = torch.tensor([[width - 3, width - 2, width - 1]] * 3)
        mask = torch.arange(3)[None, :] >= (2 - torch.arange(3) % 3)[:, None]
    else:
        positions, mask = torch.full((3, 1), width - 1), torch.ones(3, 1, dtype=torch.bool)
    return model, PromptedBatch([0, 1, 2], inputs, positions, mask)


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_sweep_equals_one_withdrawn_forward_per_layer(family):
    """The sweep (layers before l reused, layers from l on over the text rows) against brute force: one full
    forward per l with EfficiencyPlan.withdraw(4, l) in the reference implementation."""
    model, batch = _tiny(family)
    with torch.no_grad():
        sweep = sweep_withdrawal(model, batch)
        reference = reference_withdrawal(model, batch)
        by_hand = []
        original = model(**batch.inputs).logits[:, -1].log_softmax(-1)
        for layer in (1, 2, 3):
            with EfficiencyPlan.withdraw(4, layer).applied(model, "reference"):
                withdrawn = model(**batch.inputs).logits[:, -1].log_softmax(-1)
            by_hand.append(torch.nn.functional.kl_div(withdrawn, original, log_target=True, reduction="none").sum(-1))
    assert sweep.shape == (3, 3) and (sweep > 1e-6).all()
    torch.testing.assert_close(sweep, reference, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sweep, torch.stack(by_hand, dim=1), rtol=1e-4, atol=1e-6)


def test_sweep_on_a_planned_model_and_at_answer_positions():
    model, batch = _tiny("llava", answer_positions=True)
    plan = EfficiencyPlan(["naavit", "frozen", "composite", "frozen"])
    with torch.no_grad(), plan.applied(model):
        for name in ("kl", "js"):
            torch.testing.assert_close(sweep_withdrawal(model, batch, name), reference_withdrawal(model, batch, name),
                                       rtol=1e-4, atol=1e-6)
    with torch.no_grad(), EfficiencyPlan.withdraw(4, 2).applied(model):
        with pytest.raises(NotImplementedError, match="implementation='reference'"):
            sweep_withdrawal(model, batch)
        already = reference_withdrawal(model, batch)
    assert (already[:, 1:] == 0).all() and (already[:, 0] > 0).all()  # withdrawing what is gone changes nothing


def test_ranking_statistics_are_the_models_own_attention_at_the_layer_before():
    model, batch = _tiny("llava", attn="eager")
    with torch.no_grad():
        stats = ranking_statistics(model, trace(model, batch.inputs), keeps=(0.25, 1.0))
        maps = model(**batch.inputs, output_attentions=True).attentions  # L x [B, H, T, T]
    visual = token_layout(model, batch.inputs["input_ids"]).visual
    for layer in (1, 2, 3):
        last = maps[layer - 1][:, :, -1].mean(1)  # [batch, keys], averaged over heads as FastV
        mass = (last * visual).sum(-1)
        torch.testing.assert_close(stats["visual_attention"][:, layer - 1], mass, rtol=1e-4, atol=1e-6)
        p = last * visual / mass[:, None]
        top = p.sort(-1, descending=True).values[:, :8].sum(-1)  # floor(0.25 * 32) tokens
        torch.testing.assert_close(stats["kept_attention"][:, layer - 1, 0], top, rtol=1e-4, atol=1e-6)
        entropy = -(p.clamp_min(1e-30).log() * p).sum(-1)
        torch.testing.assert_close(stats["visual_entropy"][:, layer - 1], entropy, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats["kept_attention"][..., 1], torch.ones(3, 3))  # keep 1.0: all of it


def test_withdrawal_contribution_result_is_labelled_data(tmp_path):
    model, processor = build.build_untrained(0)
    model.eval()
    data = load_shapes_vqa("train", n=10)
    result = probes.withdrawal_contribution(model, processor, data, samples=5, seed=1, batch_size=3)
    assert result.withdrawal_contribution.dims == ("sample", "layer")
    assert list(result.layer.values) == list(range(1, 12)) and list(result.keep.values) == [0.1, 0.5]
    assert result.kept_attention.dims == ("sample", "layer", "keep")
    assert result.attrs["probe"] == "withdrawal_contribution" and result.attrs["divergence"] == "kl"
    assert result.withdrawal_contribution_low.dims == ("layer",) and "selection_stability" in result
    assert ((result.kept_attention > 0) & (result.kept_attention <= 1 + 1e-6)).all()
    path = probes.save_result(result, tmp_path / "wc.nc")
    xr.testing.assert_identical(probes.open_result(path, model, "withdrawal_contribution"), result)
    reference = probes.withdrawal_contribution(model, processor, data, samples=5, seed=1, batch_size=3,
                                               implementation="reference")
    xr.testing.assert_allclose(reference.withdrawal_contribution, result.withdrawal_contribution, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match=r"keeps must be fractions in \(0, 1\]"):
        probes.withdrawal_contribution(model, processor, data, samples=2, keeps=(0.0,))
    with pytest.raises(ValueError, match="implementation must be one of"):
        probes.withdrawal_contribution(model, processor, data, samples=2, implementation="fast")


def test_mode_contribution_reference_keeps_the_plans_withdrawal():
    """On a model whose plan withdraws visual tokens from layer 2, only layer 0's mode reaches the text: layer 1's
    visual outputs feed only layer 2's visual rows, which are gone. The sweep and layer_contribution refuse such a
    plan, saying what works."""
    from probes.contribution import reference_contributions, sweep_contributions

    model, batch = _tiny("llava")
    with torch.no_grad(), EfficiencyPlan.withdraw(4, 2).applied(model):
        values = reference_contributions(model, batch, ("frozen", "naavit", "composite"))
        with pytest.raises(NotImplementedError, match="implementation='reference'"):
            sweep_contributions(model, batch, ("frozen",))
        with pytest.raises(NotImplementedError, match=r"mode_contribution\(implementation='reference'\)"):
            probes.layer_contribution(model, None, None)
    assert (values[:, 1:].abs() < 1e-6).all() and (values[:, 0] > 1e-6).all()
