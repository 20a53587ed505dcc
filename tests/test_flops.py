import pytest

from analyses.cli import main
from analyses.flops import load_config, shortv_convention_flops
from eemllm_models import EfficiencyPlan

# ShortV (arXiv 2504.00502) Table 1, TFLOPs: original and under the published frozen layers.
TABLE_1 = {"llava-1.5-7b": (8.5, 4.7), "llava-1.5-13b": (16.6, 9.1)}


@pytest.mark.parametrize("model", TABLE_1)
def test_shortv_convention_reproduces_table_1(model):
    config = load_config(model)
    original = shortv_convention_flops(config, EfficiencyPlan.empty(config.text_config.num_hidden_layers))
    planned = shortv_convention_flops(config, EfficiencyPlan.preset(f"shortv:{model}"))
    assert (round(original / 1e12, 1), round(planned / 1e12, 1)) == TABLE_1[model]


def test_llava_next_counts_2880_visual_tokens():
    config = load_config("llava-next-7b")
    assert round(shortv_convention_flops(config, EfficiencyPlan.empty(32)) / 1e12, 1) == 42.7
    assert shortv_convention_flops(config, EfficiencyPlan.preset("shortv:llava-next-7b")) < 0.55 * 42.7e12


def test_flops_command_works_offline(capsys):
    assert main(["flops", "--model", "llava-1.5-7b", "--plan", "shortv:llava-1.5-7b"]) == 0
    out = capsys.readouterr().out
    assert "original 8.5 TFLOPs, planned 4.7 TFLOPs" in out and "19 frozen layers" in out


def test_convention_refuses_other_modes_and_unknown_models():
    config = load_config("llava-1.5-7b")
    with pytest.raises(ValueError, match="counts only full and frozen layers"):
        shortv_convention_flops(config, EfficiencyPlan.uniform(32, "naavit"))
    with pytest.raises(ValueError, match="not one of the shipped ones"):
        load_config("no-such-model-here")
