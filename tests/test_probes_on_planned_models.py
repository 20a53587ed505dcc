"""Probes on a model with a plan applied measure that planned model (issue: probes compose with a plan)."""

import json

import pytest
import torch

import probes
from eemllm_models import EfficiencyPlan, load_pruned, load_shapes_vqa, save_pruned
from eemllm_models.apply import applied_plan, current_plan
from eemllm_models.zoo import build
from probes.attention import attention_statistics_batch
from probes.contribution import GROUPS, reference_contributions, sweep_contributions
from test_probes import _tiny
from tiny_models import FAMILIES, family_variants

INTERVENTIONS = (*GROUPS, "frozen", "naavit", "composite")
MIXED = ["frozen", "naavit", "full", "composite"]


@pytest.mark.parametrize(("family", "plan_name"), family_variants("mixed", "frozen-run"))
def test_sweep_equals_reference_on_a_planned_model(family, plan_name):
    modes = {"mixed": MIXED, "frozen-run": ["full", "frozen", "frozen", "full"]}[plan_name]
    model, batch = _tiny(family)
    plan = EfficiencyPlan(modes)
    with torch.no_grad(), plan.applied(model):
        sweep = sweep_contributions(model, batch, INTERVENTIONS)
        reference = reference_contributions(model, batch, INTERVENTIONS)
        assert applied_plan(model).plan == plan and applied_plan(model).implementation == "fast"
    torch.testing.assert_close(sweep, reference, rtol=1e-4, atol=1e-6)
    for layer, mode in enumerate(modes):
        if mode == "frozen":  # removing an update that is already removed changes nothing
            assert (sweep[:, layer, [0, 2]] == 0).all() and (reference[:, layer, [0, 2]] == 0).all()
        if mode != "full":  # a layer's own mode is its current state
            assert (sweep[:, layer, INTERVENTIONS.index(mode)] == 0).all()
            assert (reference[:, layer, INTERVENTIONS.index(mode)] == 0).all()
    # the visual LC of a naavit/composite layer is its switch to frozen (nonzero but in the last layer,
    # whose visual rows feed nothing)
    for layer in (i for i, m in enumerate(modes) if m in ("naavit", "composite")):
        torch.testing.assert_close(sweep[:, layer, 0], sweep[:, layer, 2])
        assert (sweep[:, layer, 0] > 1e-7).all() if layer < len(modes) - 1 else (sweep[:, layer, 0] == 0).all()


def test_planned_baseline_is_the_planned_models_output():
    """The contribution of a full layer on a planned model differs from the unplanned one: later layers run planned."""
    model, batch = _tiny("llava")
    with torch.no_grad():
        unplanned = sweep_contributions(model, batch, ("visual",))
        with EfficiencyPlan(["full", "full", "frozen", "frozen"]).applied(model):
            planned = sweep_contributions(model, batch, ("visual",))
            # layer 0 by hand: the planned model with layer 0's visual rows held, against the planned model
            logits = model(**batch.inputs).logits[:, -1].log_softmax(-1)
            layer = model.model.language_model.layers[0]
            visual = batch.inputs["input_ids"] == model.config.image_token_id
            handle = layer.register_forward_hook(
                lambda module, args, kwargs, out: torch.where(visual[..., None], args[0], out), with_kwargs=True)
            ablated = model(**batch.inputs).logits[:, -1].log_softmax(-1)
            handle.remove()
    by_hand = torch.nn.functional.kl_div(ablated, logits, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(planned[:, 0, 0], by_hand, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(planned[:, 0, 0], unplanned[:, 0, 0], rtol=1e-3)
    assert (planned[:, 2:, 0] == 0).all()


def test_reference_leaves_the_applied_plan_as_it_was():
    model, batch = _tiny("llava")
    handle = EfficiencyPlan(MIXED).applied(model)
    with torch.no_grad():
        before = model(**batch.inputs).logits
        reference_contributions(model, batch, INTERVENTIONS)
        after = model(**batch.inputs).logits
    assert applied_plan(model) is handle and handle.implementation == "fast" and handle.plan.modes == MIXED
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    handle.remove()
    assert applied_plan(model) is None and current_plan(model).is_empty


@pytest.mark.parametrize("modes", [MIXED])
def test_attention_statistics_on_a_planned_model_match_its_attention_maps(modes):
    """naavit/composite layers: the statistics are those of the masked attention the planned model runs."""
    model, batch = _tiny("llava", attn="eager")
    visual = batch.inputs["input_ids"] == model.config.image_token_id
    valid = batch.inputs["attention_mask"].bool()
    with torch.no_grad(), EfficiencyPlan(modes).applied(model, "reference"):
        stats = attention_statistics_batch(model, batch, sink_tokens=1)
        maps = model(**batch.inputs, output_attentions=True).attentions
    text = valid & ~visual
    for layer, mode in enumerate(modes):
        probs = maps[layer]
        to_visual_keys = (probs * visual[:, None, None, :]).sum(-1)  # text queries still see visual keys
        text_to_visual = (to_visual_keys * text[:, None]).sum(-1) / text.sum(-1)[:, None]
        torch.testing.assert_close(stats["text_to_visual"][:, layer], text_to_visual, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stats["last_to_visual"][:, layer], to_visual_keys[:, :, -1], rtol=1e-4, atol=1e-5)
        if mode == "frozen":
            assert torch.isnan(stats["visual_to_visual"][:, layer]).all()
            assert torch.isnan(stats["entropy"][:, layer, :, 0]).all()
            own = probs.diagonal(dim1=-2, dim2=-1)
            to_self = (own * text[:, None]).sum(-1) / text.sum(-1)[:, None]  # over the queries that exist
            torch.testing.assert_close(stats["to_self"][:, layer], to_self, rtol=1e-4, atol=1e-5)
            continue
        own = probs.diagonal(dim1=-2, dim2=-1)
        to_visual = (probs * visual[:, None, None, :]).sum(-1) - own
        expected = (to_visual * visual[:, None]).sum(-1) / visual.sum(-1)[:, None]
        torch.testing.assert_close(stats["visual_to_visual"][:, layer], expected, rtol=1e-4, atol=1e-5)
        to_self = (own * valid[:, None]).sum(-1) / valid.sum(-1)[:, None]
        torch.testing.assert_close(stats["to_self"][:, layer], to_self, rtol=1e-4, atol=1e-5)
    assert (stats["visual_to_visual"][:, [1, 3]].abs() < 1e-6).all()  # naavit, composite: no visual x visual


def test_probes_of_a_pruned_model_measure_it_and_record_its_plan(tmp_path):
    model, processor = build.build_untrained(0)
    model.eval()
    plan = EfficiencyPlan.from_layers(12, range(4, 12), "frozen", policy="test")
    save_pruned(model, plan, tmp_path / "pruned", processor=processor)
    pruned, loaded_plan = load_pruned(tmp_path / "pruned")
    data = load_shapes_vqa("train", n=8)
    lc = probes.layer_contribution(pruned, processor, data, samples=4, batch_size=4, progress=False)
    assert (lc.lc.sel(group="visual", layer=list(range(4, 12))) == 0).all()
    assert (lc.lc.sel(group="visual", layer=[0, 1, 2]) > 0).all()
    recorded = json.loads(lc.attrs["plan"])
    assert recorded["modes"] == loaded_plan.modes and lc.attrs["plan_implementation"] == "fast"
    reference = probes.layer_contribution(pruned, processor, data, samples=4, batch_size=4, progress=False,
                                          implementation="reference")
    torch.testing.assert_close(torch.from_numpy(lc.lc.values), torch.from_numpy(reference.lc.values),
                               rtol=1e-4, atol=1e-6)
    modes = probes.mode_contribution(pruned, processor, data, samples=4, batch_size=4, progress=False)
    assert (modes.contribution.sel(mode="frozen", layer=list(range(4, 12))) == 0).all()
    unplanned = probes.layer_contribution(model, processor, data, samples=4, batch_size=4, progress=False)
    assert json.loads(unplanned.attrs["plan"])["modes"] == ["full"] * 12
    assert unplanned.attrs["plan_implementation"] == "none"


def test_sweep_equals_reference_on_the_trained_default_with_a_mixed_plan():
    """Real weights: the embedded default with frozen, naavit and composite layers."""
    from eemllm_models import load_default

    model, processor = load_default()
    plan = EfficiencyPlan.from_layers(12, {1: "naavit", 3: "frozen", 4: "frozen", 6: "composite", 9: "frozen"})
    data = load_shapes_vqa("validation", n=8)
    with plan.applied(model):
        kwargs = dict(samples=4, batch_size=4, progress=False)
        fast = probes.mode_contribution(model, processor, data, **kwargs)
        reference = probes.mode_contribution(model, processor, data, implementation="reference", **kwargs)
    torch.testing.assert_close(torch.from_numpy(fast.contribution.values),
                               torch.from_numpy(reference.contribution.values), rtol=1e-4, atol=1e-6)
    assert (fast.contribution.sel(mode="frozen", layer=[3, 4, 9]) == 0).all()
    assert (fast.contribution.sel(mode="naavit", layer=1) == 0).all()
    assert (fast.contribution.sel(mode="composite", layer=6) == 0).all()
