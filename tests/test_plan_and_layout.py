import json

import pytest
import torch

from eemllm_models import EfficiencyPlan, TokenLayout
from eemllm_models.plan import SHORTV_PRESETS


@pytest.mark.parametrize("name,n_layers,n_frozen", [("llava-1.5-7b", 32, 19), ("llava-1.5-13b", 40, 24),
                                                     ("llava-next-7b", 32, 19), ("llava-next-13b", 40, 24)])
def test_shortv_presets(name, n_layers, n_frozen):
    plan = EfficiencyPlan.preset(f"shortv:{name}")
    assert plan.n_layers == n_layers and len(plan.layers("frozen")) == n_frozen
    assert set(plan.layers("frozen")) == set(SHORTV_PRESETS[name][1])
    assert plan.provenance["policy"] == "shortv-paper"


def test_json_round_trip_keeps_modes_and_provenance(tmp_path):
    plan = EfficiencyPlan.from_layers(6, {0: "naavit", 3: "composite", 5: "frozen"}, model="m", probe="lc")
    assert plan.modes == ["naavit", "full", "full", "composite", "full", "frozen"]
    assert EfficiencyPlan.from_json(plan.to_json()) == plan
    path = plan.save(tmp_path / "plans" / "plan.json")
    loaded = EfficiencyPlan.load(path)
    assert loaded.modes == plan.modes and loaded.provenance["probe"] == "lc" and "saved_at" in loaded.provenance
    assert [p.name for p in path.parent.iterdir()] == ["plan.json"]


def test_plan_validation_errors():
    with pytest.raises(ValueError, match="unknown preset 'shortv:llava-2'; known presets: shortv:llava-1.5-7b"):
        EfficiencyPlan.preset("shortv:llava-2")
    with pytest.raises(ValueError, match=r"layer indices \[7\] are outside 0..5"):
        EfficiencyPlan.from_layers(6, [1, 7])
    with pytest.raises(ValueError, match="one mode per decoder layer"):
        EfficiencyPlan([])
    with pytest.raises(ValueError, match="'modes' list"):
        EfficiencyPlan.from_dict(json.loads('{"layers": [1]}'))
    assert EfficiencyPlan.uniform(3, "frozen").modes == ["frozen"] * 3
    assert EfficiencyPlan.empty(3).is_empty and not EfficiencyPlan.uniform(3, "naavit").is_empty


def test_layout_from_image_token_ids_with_padding_and_two_images():
    ids = torch.tensor([[0, 0, 1, 9, 3, 3, 8, 3, 3, 3, 7],
                        [1, 9, 9, 3, 3, 3, 3, 8, 3, 7, 7]])
    mask = (ids != 0).long()
    layout = TokenLayout.from_input_ids(ids, [3], mask)
    assert layout.n_visual.tolist() == [5, 5]
    assert layout.n_text.tolist() == [4, 6]
    assert layout.image_spans(0) == [(4, 6), (7, 10)]
    assert layout.image_spans(1) == [(3, 7), (8, 9)]
    assert not (layout.text & layout.visual).any() and not layout.valid[0, :2].any()


def test_layout_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, seq\]"):
        TokenLayout.from_input_ids(torch.tensor([1, 3]), [3])
    with pytest.raises(ValueError, match="attention_mask shape"):
        TokenLayout.from_input_ids(torch.tensor([[1, 3]]), [3], torch.ones(1, 3))
