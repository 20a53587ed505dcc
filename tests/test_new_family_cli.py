"""The whole CLI on a checkpoint of one of the new families, loaded from disk as a user's would be.

``eemllm probe``, ``plan``, ``prune``, ``evaluate`` (on the pruned folder), ``flops`` and ``latency`` run with
``--model DIR`` on a tiny random Idefics3 saved with save_pretrained together with its real processor
(tests/new_family_checkpoint.py), on a handful of shapes-vqa questions. The model is random, so its answers
are garbage: what is checked is that every command runs, writes its files, and that the numbers are finite
and agree with each other (the plan freezes the lowest-LC layers, the FLOPs ``eemllm flops`` prints are those
the plan recorded, the pruned folder answers as the plan applied to the original does). The lmms-eval plugin loads
the same checkpoint and answers as eemllm does, also through lmms-eval's simple_evaluate (slow); those
tests skip without lmms-eval, which the plugin module imports.
"""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from new_family_checkpoint import N_LAYERS, save_idefics3_checkpoint
from transformers import (
    AutoProcessor,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
)

from analyses.choosing.methods import describe
from analyses.cli import main
from eemllm_models import (
    EfficiencyPlan,
    apply_plan,
    load_model,
    load_pruned,
    load_shapes_vqa,
    token_layout,
)
from eemllm_models.families import family_of
from eemllm_models.generation import build_prompt, encode_prompts

SUBIMAGES = 5  # a 160 px shapes-vqa image: 2 x 2 sub-images of 32 px and the global image


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_idefics3_checkpoint(tmp_path_factory.mktemp("idefics3") / "checkpoint")


@pytest.fixture(scope="module")
def probed(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe")
    assert main(["probe", "--model", str(checkpoint), "--samples", "4", "--rows", "8", "--batch-size", "2",
                 "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def plan_file(checkpoint, probed, tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    assert main(["plan", "--model", str(checkpoint), "--lc", str(probed / "lc.nc"), "--k", "2",
                 "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def pruned(checkpoint, plan_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("prune") / "pruned"
    assert main(["prune", "--model", str(checkpoint), "--plan", str(plan_file), "--out", str(out)]) == 0
    return out


def test_the_checkpoint_loads_from_disk_with_its_processor(checkpoint):
    model, processor = load_model(checkpoint)
    assert isinstance(model, Idefics3ForConditionalGeneration) and isinstance(processor, Idefics3Processor)
    assert family_of(model).name == "idefics3" and len(family_of(model).decoder_layers(model)) == N_LAYERS
    rows = load_shapes_vqa("test", n=2)
    batch = encode_prompts(model, processor, rows["image"], [build_prompt(processor, q) for q in rows["question"]])
    layout = token_layout(model, batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=batch["pixel_values"],
                                                  pixel_attention_mask=batch["pixel_attention_mask"]).pooler_output
    per_image = SUBIMAGES * model.model.image_seq_len
    assert layout.n_visual.tolist() == [per_image] * 2 and sum(len(f) for f in features) == 2 * per_image
    markers = torch.isin(batch["input_ids"], torch.tensor(processor.tokenizer.convert_tokens_to_ids(
        ["<fake_token_around_image>", "<global-img>", "<row_1_col_1>"])))
    assert bool(markers.any(-1).all()) and not bool(layout.visual[markers].any())  # the markers are text


def test_probe_writes_finite_results_for_every_layer(checkpoint, probed):
    lc = xr.load_dataset(probed / "lc.nc")
    assert lc.lc.dims == ("sample", "layer", "group") and dict(lc.lc.sizes) == {"sample": 4, "layer": N_LAYERS,
                                                                              "group": 2}
    assert lc.attrs["model"] == str(checkpoint) and lc.attrs["model_class"] == "Idefics3ForConditionalGeneration"
    assert bool(np.isfinite(lc.lc).all()) and bool((lc.lc >= 0).all())
    modes = xr.load_dataset(probed / "mode_contribution.nc")
    assert list(modes["mode"].values) == ["frozen", "naavit", "composite"]
    assert bool(np.isfinite(modes.contribution).all())
    xr.testing.assert_allclose(modes.contribution.sel(mode="frozen", drop=True), lc.lc.sel(group="visual", drop=True),
                               rtol=1e-5, atol=1e-8)
    attention = xr.load_dataset(probed / "attention.nc")
    assert "text_to_visual" in attention and bool(np.isfinite(attention.text_to_visual).all())


def test_plan_freezes_the_lowest_lc_layers_and_records_the_processors_tokens(probed, plan_file, checkpoint,
                                                                              tmp_path):
    plan = EfficiencyPlan.load(plan_file)
    visual_lc = xr.load_dataset(probed / "lc.nc").lc.sel(group="visual").mean("sample").values
    assert plan.n_layers == N_LAYERS and set(plan.layers("frozen")) == set(np.argsort(visual_lc)[:2].tolist())
    provenance = plan.provenance
    assert 0 < provenance["flops_ratio"] < 1 and 0 < provenance["prefill_flops_ratio"] < 1
    assert provenance["tokens"]["visual"] == SUBIMAGES * AutoProcessor.from_pretrained(checkpoint).image_seq_len
    greedy = tmp_path / "greedy.json"
    assert main(["plan", "--model", str(checkpoint), "--policy", "greedy", "--modes",
                 str(probed / "mode_contribution.nc"), "--samples", "3", "--out", str(greedy)]) == 0
    chosen = EfficiencyPlan.load(greedy).provenance
    assert 0 <= chosen["accuracy"] <= 1 and 0 < chosen["flops_ratio"] <= 1


def test_the_pruned_folder_answers_as_the_plan_applied_to_the_original(checkpoint, plan_file, pruned, tmp_path):
    model, plan = load_pruned(pruned)
    assert isinstance(model, Idefics3ForConditionalGeneration) and plan.modes == EfficiencyPlan.load(plan_file).modes
    assert isinstance(AutoProcessor.from_pretrained(pruned), Idefics3Processor)
    assert main(["evaluate", "--model", str(pruned), "--samples", "4", "--out", str(tmp_path / "pruned")]) == 0
    assert main(["evaluate", "--model", str(checkpoint), "--plan", str(plan_file), "--samples", "4",
                 "--out", str(tmp_path / "planned")]) == 0
    saved = json.loads((tmp_path / "pruned" / "scores.json").read_text())
    assert saved["plan"]["modes"] == plan.modes and 0 <= saved["scores"]["overall"] <= 1
    answers = pd.read_csv(tmp_path / "pruned" / "answers.csv", keep_default_na=False)
    assert len(answers) == 4 and set(answers.correct) <= {True, False}
    planned = pd.read_csv(tmp_path / "planned" / "answers.csv", keep_default_na=False)
    assert list(answers.prediction) == list(planned.prediction)


def test_flops_prints_what_the_plan_recorded(checkpoint, plan_file, pruned, capsys):
    provenance = EfficiencyPlan.load(plan_file).provenance
    capsys.readouterr()
    assert main(["flops", "--model", str(checkpoint), "--plan", str(plan_file)]) == 0
    assert f"({provenance['flops_ratio']:.1%} of the original)" in capsys.readouterr().out
    assert main(["flops", "--model", str(checkpoint), "--plan", str(plan_file), "--convention", "full"]) == 0
    printed = capsys.readouterr().out
    assert "prefill vision_tower" in printed and "prefill projector" in printed  # Idefics3's tower is counted
    assert f"prefill total: {provenance['prefill_flops_ratio']:.1%} of the original" in printed
    assert main(["flops", "--model", str(pruned)]) == 0  # a pruned folder counts the plan it carries
    printed = capsys.readouterr().out
    assert f"({describe(EfficiencyPlan.load(plan_file))})" in printed
    assert f"({provenance['flops_ratio']:.1%} of the original)" in printed


@pytest.mark.parametrize("pruned_model", [False, True], ids=["plan", "pruned"])
def test_latency_measures_the_original_and_the_plan(checkpoint, plan_file, pruned, pruned_model, tmp_path):
    model = ["--model", str(pruned)] if pruned_model else ["--model", str(checkpoint), "--plan", str(plan_file)]
    assert main(["latency", *model, "--samples", "2", "--batch-size", "2", "--new-tokens", "2", "--warmup", "0",
                 "--repeats", "1", "--out", str(tmp_path)]) == 0
    frame = pd.read_csv(tmp_path / "latency.csv")
    assert list(frame.variant) == ["original", "planned"] and frame.prefill_speedup[0] == 1
    for column in ("prefill_ms", "decode_tokens_per_s", "prefill_speedup", "decode_speedup"):
        assert all(math.isfinite(v) and v > 0 for v in frame[column])


def test_lmms_plugin_loads_the_checkpoint_with_a_plan(checkpoint, plan_file, pruned):
    pytest.importorskip("lmms_eval")
    from analyses.evaluating.lmms_model import load_for_lmms
    from eemllm_models.apply import applied_plan

    plan = EfficiencyPlan.load(plan_file)
    model, processor, chosen = load_for_lmms(str(checkpoint), plan=str(plan_file), dtype="float32")
    assert isinstance(processor, Idefics3Processor) and chosen.modes == plan.modes
    assert applied_plan(model).plan.modes == plan.modes
    rows = load_shapes_vqa("test", n=2)
    batch = encode_prompts(model, processor, rows["image"], [build_prompt(processor, q) for q in rows["question"]])
    reference, _ = load_model(checkpoint)
    apply_plan(reference, plan, "reference")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=1e-4, atol=1e-5)
    assert load_for_lmms(str(pruned))[2].modes == plan.modes


def _requests(rows, kind, seconds):
    """One lmms-eval request per row: (question, seconds[i], doc_to_visual, doc_id, task, split)."""
    from lmms_eval.api.instance import Instance

    return [Instance(kind, (row["question"], second, lambda doc: [doc["image"]], i, "shapes", "test"), 0,
                     {"task": "shapes", "doc_id": i, "repeats": 1}) for i, (row, second) in enumerate(zip(rows, seconds))]


def test_lmms_plugin_answers_as_eemllm_does_under_the_plan(checkpoint, plan_file):
    pytest.importorskip("lmms_eval")
    from analyses.evaluating.lmms_model import EemllmLlava
    from eemllm_models import generate_answers

    rows, plan = load_shapes_vqa("test", n=3), EfficiencyPlan.load(plan_file)
    lm = EemllmLlava(pretrained=str(checkpoint), plan=str(plan_file), device="cpu", dtype="float32")
    lm.task_dict = {"shapes": {"test": rows}}
    answers = lm.generate_until(_requests(rows, "generate_until", [{"max_new_tokens": 4, "until": ["\n\n"]}] * 3))
    model, processor = load_model(checkpoint)
    with plan.applied(model):
        expected = generate_answers(model, processor, rows["image"], rows["question"], batch_size=1,
                                    max_new_tokens=4, progress=False)
    assert answers == expected and all(answers)
    # the first greedy token is the greedy continuation (the random model's later ones include special tokens,
    # which decoding drops); its log-probability is the one generate() scores it with
    firsts = lm.generate_until(_requests(rows, "generate_until", [{"max_new_tokens": 1}] * 3))
    assert all(firsts)
    scored = lm.loglikelihood(_requests(rows, "loglikelihood", [" " + a for a in firsts]))
    assert all(greedy and math.isfinite(logprob) for logprob, greedy in scored)
    batch = lm._encode([lm._prompt(rows[0]["question"], 1)], [rows[0]["image"]])
    out = lm.model.generate(**batch, max_new_tokens=1, do_sample=False, output_logits=True,
                            return_dict_in_generate=True)
    token = out.sequences[0, batch["input_ids"].shape[1]]
    assert scored[0][0] == pytest.approx(float(torch.log_softmax(out.logits[0][0].float(), -1)[token]), abs=1e-4)
    wrong = lm.loglikelihood(_requests(rows, "loglikelihood", [" purple"] * 3))
    assert all(w < s and not greedy for (w, greedy), (s, _) in zip(wrong, scored))


@pytest.mark.slow
def test_lmms_simple_evaluate_on_a_local_task_scores_like_eemllm(checkpoint, plan_file, tmp_path):
    pytest.importorskip("lmms_eval")
    import datasets
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager
    from test_lmms_plugin import TASK_YAML

    from analyses.evaluating.evaluate import answer_frame

    rows = load_shapes_vqa("test", n=6)
    datasets.DatasetDict({"test": rows}).save_to_disk(str(tmp_path / "data"))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "shapes_local.yaml").write_text(TASK_YAML.format(data=tmp_path / "data"))
    (tmp_path / "tasks" / "shapes_utils.py").write_text("def doc_to_visual(doc):\n    return [doc['image']]\n")
    result = simple_evaluate(model="eemllm", model_args=f"pretrained={checkpoint},plan={plan_file},dtype=float32",
                             tasks=["shapes_local"], limit=6, device="cpu", batch_size=1,
                             task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False))
    model, processor = load_model(checkpoint)
    frame = answer_frame(model, processor, rows, plan=EfficiencyPlan.load(plan_file), batch_size=1, progress=False)
    predictions = [sample["resps"][0][0] for sample in sorted(result["samples"]["shapes_local"],
                                                               key=lambda s: s["doc_id"])]
    assert predictions == list(frame.prediction)
    assert result["results"]["shapes_local"]["exact_match,none"] == pytest.approx(frame.correct.mean())
