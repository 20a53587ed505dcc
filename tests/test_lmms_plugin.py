"""The lmms-eval model plugin (``analyses.evaluating.lmms_model``) against eemllm's own answering.

Everything but the import-isolation check skips where lmms-eval is not installed (CI installs
only ``.[test]``); install ``.[lmms]`` to run them.
"""

import re
from pathlib import Path

import pytest
import torch

from eemllm_models import EfficiencyPlan, generate_answers, load_shapes_vqa, save_pruned

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def plugin():
    pytest.importorskip("lmms_eval")
    from analyses.evaluating import lmms_model

    return lmms_model


@pytest.fixture(scope="module")
def rows():
    return load_shapes_vqa("test", n=3)


@pytest.fixture(scope="module")
def plan():
    return EfficiencyPlan.from_layers(12, [7, 8, 9, 10, 11], "frozen", policy="test")


def _requests(rows, kind, seconds, task="shapes"):
    """One lmms-eval request per row: (question, seconds[i], doc_to_visual, doc_id, task, split)."""
    from lmms_eval.api.instance import Instance

    return [Instance(kind, (row["question"], second, lambda doc: [doc["image"]], i, task, "test"), 0,
                     {"task": task, "doc_id": i, "repeats": 1}) for i, (row, second) in enumerate(zip(rows, seconds))]


def _plugin_model(plugin, rows, **kwargs):
    lm = plugin.EemllmLlava(device="cpu", **kwargs)
    lm.task_dict = {"shapes": {"test": rows}}
    return lm


def test_nothing_else_in_eemllm_imports_lmms_eval():
    pattern = re.compile(r"^\s*(from|import)\s+(lmms_eval|analyses\.lmms_model)\b|lmms_model import", re.MULTILINE)
    offenders = [str(p.relative_to(ROOT)) for package in ("eemllm_models", "probes", "analyses")
                 for p in (ROOT / package).rglob("*.py")
                 if p.name != "lmms_model.py" and pattern.search(p.read_text())]
    assert offenders == []


def test_entry_point_registers_the_model(plugin):
    from lmms_eval.models import get_model, list_available_models

    assert "eemllm" in list_available_models()
    assert get_model("eemllm") is plugin.EemllmLlava


def test_generate_until_matches_generate_answers_under_a_plan(plugin, rows, plan, default_model, tmp_path):
    plan_file = plan.save(tmp_path / "plan.json")
    lm = _plugin_model(plugin, rows, pretrained="default", plan=str(plan_file))
    assert lm.plan.modes == plan.modes
    answers = lm.generate_until(_requests(rows, "generate_until", [{"max_new_tokens": 8, "until": ["\n\n"]}] * 3))
    model, processor = default_model
    with plan.applied(model):
        expected = generate_answers(model, processor, rows["image"], rows["question"], batch_size=1, progress=False)
    assert answers == expected


def test_generate_until_cuts_at_stop_strings_and_answers_text_only_prompts(plugin, rows):
    lm = _plugin_model(plugin, rows, pretrained="default", batch_size=2)
    full = lm.generate_until(_requests(rows, "generate_until", [{"max_new_tokens": 8}] * 3))
    first = full[0]
    assert len(first) > 1
    cut = lm.generate_until(_requests(rows, "generate_until", [{"max_new_tokens": 8, "until": [first[1:]]}] * 3))
    assert cut[0] == first[:1] and cut[1:] == full[1:]
    text_only = _requests(rows, "generate_until", [{"max_new_tokens": 4}])[0]
    text_only.arguments = (text_only.arguments[0], text_only.arguments[1], None, *text_only.arguments[3:])
    assert isinstance(lm.generate_until([text_only])[0], str)


def test_loglikelihood_of_the_greedy_answer_is_greedy_and_matches_generate(plugin, rows):
    lm = _plugin_model(plugin, rows, pretrained="default")
    answers = lm.generate_until(_requests(rows, "generate_until", [{"max_new_tokens": 8}] * 3))
    scored = lm.loglikelihood(_requests(rows, "loglikelihood", [" " + a for a in answers]))
    assert all(greedy for _, greedy in scored)
    batch = lm.processor(images=[rows[0]["image"]], text=[lm._prompt(rows[0]["question"], 1)], return_tensors="pt")
    out = lm.model.generate(**batch, max_new_tokens=8, do_sample=False, output_logits=True,
                            return_dict_in_generate=True)
    tokens = out.sequences[0, batch["input_ids"].shape[1]:]
    n_answer = int((tokens != lm.processor.tokenizer.eos_token_id).sum())
    logprobs = [torch.log_softmax(out.logits[i][0].float(), -1)[tokens[i]] for i in range(n_answer)]
    assert scored[0][0] == pytest.approx(float(sum(logprobs)), abs=1e-4)
    wrong = lm.loglikelihood(_requests(rows, "loglikelihood", [" purple"] * 3))
    assert all(w < s for (w, _), (s, _) in zip(wrong, scored))


def test_pruned_directory_brings_its_plan(plugin, rows, plan, default_model, tmp_path):
    model, processor = default_model
    path = save_pruned(model, plan, tmp_path / "pruned", processor=processor)
    lm = _plugin_model(plugin, rows, pretrained=str(path))
    assert lm.plan.modes == plan.modes
    with pytest.raises(ValueError, match="carries its own plan"):
        plugin.EemllmLlava(pretrained=str(path), plan="shortv:llava-1.5-7b", device="cpu")


def test_bad_arguments_name_the_fix(plugin, rows):
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        plugin.EemllmLlava(batch_size="auto")
    with pytest.raises(ValueError, match="not a torch dtype"):
        plugin.EemllmLlava(dtype="float99")
    with pytest.raises(ValueError, match="12 decoder layers"):
        plugin.EemllmLlava(plan="shortv:llava-1.5-7b", device="cpu")
    lm = _plugin_model(plugin, rows, pretrained="default")
    with pytest.raises(NotImplementedError, match="multi-round"):
        lm.generate_until_multi_round([])
    assert plugin.generation_settings({"temperature": 0, "do_sample": True, "image_aspect_ratio": "pad"}) == (
        {"max_new_tokens": plugin.DEFAULT_MAX_NEW_TOKENS, "num_beams": 1, "do_sample": False}, [])


TASK_YAML = """\
task: shapes_local
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function shapes_utils.doc_to_visual
doc_to_text: "{{{{question}}}}"
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: 8
  until: ["\\n\\n"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.mark.slow
def test_simple_evaluate_on_a_local_task_scores_like_eemllm(plugin, plan, default_model, tmp_path):
    import datasets
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from analyses.evaluating.evaluate import answer_frame

    rows = load_shapes_vqa("test", n=6)
    datasets.DatasetDict({"test": rows}).save_to_disk(str(tmp_path / "data"))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "shapes_local.yaml").write_text(TASK_YAML.format(data=tmp_path / "data"))
    (tmp_path / "tasks" / "shapes_utils.py").write_text("def doc_to_visual(doc):\n    return [doc['image']]\n")
    plan_file = plan.save(tmp_path / "plan.json")
    result = simple_evaluate(model="eemllm", model_args=f"pretrained=default,plan={plan_file}",
                             tasks=["shapes_local"], limit=6, device="cpu", batch_size=1,
                             task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False))
    model, processor = default_model
    frame = answer_frame(model, processor, rows, plan=plan, batch_size=1, progress=False)
    predictions = [sample["resps"][0][0] for sample in sorted(result["samples"]["shapes_local"],
                                                               key=lambda s: s["doc_id"])]
    assert predictions == list(frame.prediction)
    assert result["results"]["shapes_local"]["exact_match,none"] == pytest.approx(frame.correct.mean())
