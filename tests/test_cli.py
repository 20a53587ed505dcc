import json
import os
import re
import subprocess
import sys

import pandas as pd
import pytest
import torch
import xarray as xr

from transformers import AutoProcessor

from analyses.cli import main
from analyses.evaluating.evaluate import answer_frame, scores
from eemllm_models import EfficiencyPlan, load_pruned, load_shapes_vqa


def test_demo_runs_the_flow_and_its_pruned_model_scores_as_reported(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(["eemllm", "demo", "--out", str(out), "--n", "14", "--probe-samples", "4",
                             "--compare-samples", "14"], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert "overall:" in result.stdout and "Layer Contribution" in result.stdout and "ShortV plan" in result.stdout
    assert "prefill" in result.stdout and "text" in result.stdout
    assert "methods at 50% of the decoder FLOPs" in result.stdout
    report = json.loads((out / "report" / "summary.json").read_text())
    assert (out / "report" / "index.html").is_file() and (out / "report" / "report.md").is_file()
    assert report["claims"].keys() and pd.read_csv(out / "comparison.csv").policy.nunique() == 5
    assert "../pruned-model/" in (out / "report" / "index.html").read_text()
    methods = pd.read_csv(out / "methods.csv").set_index("method")
    assert list(methods.index) == ["original", "shortv", "naavit", "composite", "vtw", "fastv", "budget"]
    assert (methods.n == 14).all() and (methods.target == 0.5).all()
    assert (methods.drop(index=["original", "naavit", "composite"]).flops_ratio <= 0.5).all()
    assert "Layer-level vs token-level" in (out / "report" / "index.html").read_text()
    assert [r["method"] for r in report["methods"]] == list(methods.index) and (out / "withdrawal.nc").is_file()
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["n"] == 14 and 0 <= summary["accuracy"]["overall"] <= 1
    assert 0 < summary["decoder_flops_ratio"] < 1
    assert len(pd.read_csv(out / "demo_answers.csv")) == 14  # multiple-choice questions span several lines
    assert (out / "lc.nc").is_file() and EfficiencyPlan.load(out / "plan.json").modes == summary["plan"]["modes"]
    model, plan = load_pruned(out / "pruned-model")
    processor = AutoProcessor.from_pretrained(out / "pruned-model")
    rescored = scores(answer_frame(model, processor, load_shapes_vqa("test", n=14), batch_size=14, progress=False))
    # metrics that do not apply (no "yes" answer among these 14) are NaN here and null in the JSON
    assert pd.Series(rescored).equals(pd.Series(summary["pruned_accuracy"], dtype=float))
    assert plan.modes == summary["plan"]["modes"]
    again = subprocess.run(["eemllm", "demo", "--out", str(out), "--n", "14"], capture_output=True, text=True)
    assert again.returncode == 2 and "pass --overwrite" in again.stderr
    assert main(["report", "--probes", str(out), "--out", str(out / "report")]) == 2
    assert main(["report", "--probes", str(out), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "index.html").is_file()


def test_evaluate_and_prune_commands(tmp_path, capsys):
    assert main(["evaluate", "--samples", "14", "--plan", str(_frozen_plan(tmp_path)), "--out", str(tmp_path / "e")]) == 0
    saved = json.loads((tmp_path / "e" / "scores.json").read_text())
    assert saved["plan"]["modes"][11] == "frozen" and "yes_no_f1" in saved["scores"]
    assert main(["prune", "--plan", str(_frozen_plan(tmp_path)), "--out", str(tmp_path / "p")]) == 0
    assert load_pruned(tmp_path / "p")[1].layers("frozen") == (10, 11)
    assert main(["prune", "--plan", str(_frozen_plan(tmp_path)), "--out", str(tmp_path / "p")]) == 2
    assert "already exists" in capsys.readouterr().err


def _frozen_plan(tmp_path):
    return EfficiencyPlan.from_layers(12, [10, 11]).save(tmp_path / "plan.json")


def test_bad_argument_is_a_clear_error(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--n", "0"]) == 2
    assert "--n must be at least 1" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_module_runs_as_a_script():
    result = subprocess.run([sys.executable, "-m", "analyses.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "demo" in result.stdout


def _probe(tmp_path, out: str, *launcher: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    command = [*launcher, "-m", "analyses.cli", "probe", "--samples", "6", "--batch-size", "2", "--seed", "3",
               "--out", str(tmp_path / out), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)


def test_probe_command_writes_lc_and_the_other_probes(tmp_path):
    result = _probe(tmp_path, "probe", sys.executable)
    assert result.returncode == 0, result.stderr
    lc = xr.load_dataset(tmp_path / "probe" / "lc.nc")
    assert lc.lc.dims == ("sample", "layer", "group") and lc.attrs["seed"] == 3 and lc.sizes["sample"] == 6
    assert "Layer Contribution (kl" in result.stdout and "visual LC below text LC" in result.stdout
    modes = xr.load_dataset(tmp_path / "probe" / "mode_contribution.nc")
    assert list(modes["mode"].values) == ["frozen", "naavit", "composite"]
    xr.testing.assert_allclose(modes.contribution.sel(mode="frozen", drop=True), lc.lc.sel(group="visual", drop=True),
                               rtol=1e-5, atol=1e-8)
    assert "text_to_visual" in xr.load_dataset(tmp_path / "probe" / "attention.nc")


def test_probe_on_two_processes_equals_one(tmp_path):
    one = _probe(tmp_path, "one", sys.executable, extra=("--probes", "lc"))
    two = _probe(tmp_path, "two", sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                 "2", extra=("--probes", "lc"))
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    xr.testing.assert_identical(xr.load_dataset(tmp_path / "one" / "lc.nc"), xr.load_dataset(tmp_path / "two" / "lc.nc"))


def test_plan_command_freezes_the_lowest_lc_layers(tmp_path, capsys):
    import numpy as np

    dims = ("sample", "layer", "group")
    lc = xr.Dataset({"lc": (dims, np.array([[[0.3, 1.0], [0.0, 1.0], [0.2, 1.0]]])),
                     "cosine": (dims, np.zeros((1, 3, 2)))},
                    coords={"sample": ["a"], "layer": range(3), "group": ["visual", "text"]},
                    attrs={"probe": "layer_contribution"})
    lc.to_netcdf(tmp_path / "lc.nc", engine="h5netcdf")
    assert main(["plan", "--lc", str(tmp_path / "lc.nc"), "--k", "2", "--out", str(tmp_path / "plan.json")]) == 0
    assert EfficiencyPlan.load(tmp_path / "plan.json").modes == ["full", "frozen", "frozen"]
    assert main(["plan", "--lc", str(tmp_path / "missing.nc"), "--k", "2", "--out", str(tmp_path / "p.json")]) == 2
    assert "run `eemllm probe`" in capsys.readouterr().err


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe")
    assert main(["probe", "--samples", "2", "--rows", "20", "--probes", "lc", "modes", "--out", str(out)]) == 0
    return out


def test_plan_command_runs_every_policy(probe_dir, tmp_path):
    lc, modes = str(probe_dir / "lc.nc"), str(probe_dir / "mode_contribution.nc")
    assert main(["plan", "--lc", lc, "--k", "4", "--policy", "cosine", "--out", str(tmp_path / "c.json")]) == 0
    assert len(EfficiencyPlan.load(tmp_path / "c.json").layers("frozen")) == 4
    assert main(["plan", "--policy", "budget", "--modes", modes, "--target", "0.6", "--out", str(tmp_path / "b.json")]) == 0
    assert EfficiencyPlan.load(tmp_path / "b.json").provenance["flops_ratio"] <= 0.6
    assert main(["plan", "--policy", "shortv", "--lc", lc, "--tolerance", "0", "--samples", "3",
                 "--out", str(tmp_path / "t.json")]) == 0
    assert set(EfficiencyPlan.load(tmp_path / "t.json").provenance["accuracy_by_k"]) == {str(k) for k in range(13)}
    assert main(["plan", "--policy", "greedy", "--modes", modes, "--samples", "2", "--out", str(tmp_path / "g.json")]) == 0
    assert EfficiencyPlan.load(tmp_path / "g.json").provenance["policy"] == "greedy"


def test_plan_and_load_errors_name_the_fix(probe_dir, tmp_path, capsys):
    assert main(["plan", "--lc", str(probe_dir / "lc.nc"), "--out", str(tmp_path / "x.json")]) == 2
    assert "needs either --k" in capsys.readouterr().err
    assert main(["plan", "--policy", "budget", "--out", str(tmp_path / "x.json")]) == 2
    assert "needs --modes" in capsys.readouterr().err
    assert main(["plan", "--policy", "budget", "--modes", str(probe_dir / "lc.nc"), "--out", str(tmp_path / "x.json")]) == 2
    assert "mode_contribution" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["evaluate", "--device", "cuda", "--out", str(tmp_path / "e")]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    other_model = EfficiencyPlan.preset("shortv:llava-1.5-7b").save(tmp_path / "7b.json")
    assert main(["evaluate", "--plan", str(other_model), "--samples", "2", "--out", str(tmp_path / "e")]) == 2
    assert "the plan has 32 layers but LlavaForConditionalGeneration has 12" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "e").exists()


def test_compare_command_writes_the_policy_table(probe_dir, tmp_path, capsys):
    out = tmp_path / "compare.csv"
    assert main(["compare", "--lc", str(probe_dir / "lc.nc"), "--ks", "2", "--seeds", "0", "--samples", "3",
                 "--out", str(out)]) == 0
    frame = pd.read_csv(out)
    assert sorted(frame.policy) == ["cosine", "original", "random", "shortv", "text"]
    printed = capsys.readouterr().out
    assert "shortv" in printed and "interval" in printed and "95% intervals: Wilson score" in printed
    verdicts = "(holds|partly holds|not resolved at this n|does not hold|not measured)"
    assert re.search(f"at equal FLOPs: {verdicts}\n", printed)
    assert re.search(f"costs far more accuracy than freezing visual tokens: {verdicts}\n", printed)


def test_commands_load_a_pruned_model_with_its_plan(tmp_path, capsys):
    assert main(["prune", "--plan", str(_frozen_plan(tmp_path)), "--dtype", "bfloat16", "--out", str(tmp_path / "p")]) == 0
    assert main(["evaluate", "--model", str(tmp_path / "p"), "--samples", "3", "--out", str(tmp_path / "e")]) == 0
    saved = json.loads((tmp_path / "e" / "scores.json").read_text())
    assert saved["plan"]["modes"][10:] == ["frozen", "frozen"]


def test_latency_command_measures_original_and_planned(tmp_path, capsys):
    assert main(["latency", "--plan", str(_frozen_plan(tmp_path)), "--samples", "2", "--new-tokens", "2",
                 "--warmup", "0", "--repeats", "1", "--out", str(tmp_path / "l")]) == 0
    frame = pd.read_csv(tmp_path / "l" / "latency.csv")
    assert list(frame.variant) == ["original", "planned"] and frame.prefill_speedup[0] == 1
    assert "prefill_speedup" in capsys.readouterr().out


def test_report_command_refuses_an_incomplete_probe_file(probe_dir, tmp_path, capsys):
    incomplete = tmp_path / "probes"
    incomplete.mkdir()
    xr.load_dataset(probe_dir / "lc.nc").drop_vars("lc").to_netcdf(incomplete / "lc.nc")
    _frozen_plan(incomplete)
    assert main(["report", "--probes", str(incomplete), "--out", str(tmp_path / "r")]) == 2
    assert "eemllm probe" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_plan_greedy_honours_target_and_prints_flops_and_held_out_accuracy(probe_dir, tmp_path, capsys):
    modes, out = str(probe_dir / "mode_contribution.nc"), tmp_path / "g.json"
    assert main(["plan", "--policy", "greedy", "--modes", modes, "--samples", "2", "--target", "0.95",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    provenance = EfficiencyPlan.load(out).provenance
    assert provenance["target"] == 0.95
    assert provenance["flops_ratio"] <= 0.95 or provenance["reached_target"] is False
    assert provenance["selection"] == {"dataset": "shapes-vqa", "split": "validation", "n": 2}
    assert provenance["tokens"]["source"] == "mean prompt of shapes-vqa validation (n=2)"
    assert f"decoder prefill FLOPs: {provenance['flops_ratio']:.1%} of the original (shortv convention" in printed
    assert f"held-out accuracy on shapes-vqa validation (n=2): {provenance['accuracy']:.1%}" in printed
    # what `eemllm flops` prints for that plan is the ratio its provenance recorded, under each convention
    assert main(["flops", "--model", "default", "--plan", str(out)]) == 0
    assert f"({provenance['flops_ratio']:.1%} of the original)" in capsys.readouterr().out
    assert main(["flops", "--model", "default", "--plan", str(out), "--convention", "full"]) == 0
    assert f"prefill total: {provenance['prefill_flops_ratio']:.1%} of the original" in capsys.readouterr().out
    assert main(["plan", "--lc", str(probe_dir / "lc.nc"), "--k", "2", "--target", "0.5",
                 "--out", str(tmp_path / "k.json")]) == 2
    assert "drop --target" in capsys.readouterr().err and not (tmp_path / "k.json").exists()


def test_plan_by_k_records_and_prints_the_flops_the_flops_command_prints(probe_dir, tmp_path, capsys):
    out = tmp_path / "k.json"
    assert main(["plan", "--lc", str(probe_dir / "lc.nc"), "--k", "7", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    provenance = EfficiencyPlan.load(out).provenance
    assert "mean prompt of shapes-vqa test (n=28)" in provenance["tokens"]["source"]
    assert f"{provenance['flops_ratio']:.1%} of the original" in printed and "not measured" in printed
    assert "0.0 TFLOPs" not in printed and ("MFLOPs" in printed or "GFLOPs" in printed)
    assert main(["flops", "--model", "default", "--plan", str(out)]) == 0
    assert f"({provenance['flops_ratio']:.1%} of the original)" in capsys.readouterr().out


def test_compare_defaults_to_the_validation_split_and_records_it(probe_dir, tmp_path, capsys):
    out = tmp_path / "compare.csv"
    assert main(["compare", "--lc", str(probe_dir / "lc.nc"), "--ks", "1", "--policies", "shortv", "--samples", "2",
                 "--out", str(out)]) == 0
    frame = pd.read_csv(out)
    assert set(frame.split) == {"validation"} and set(frame.n) == {2}
    assert "accuracy on shapes-vqa validation (n=2)" in capsys.readouterr().out
    assert main(["compare", "--lc", str(probe_dir / "lc.nc"), "--ks", "1", "--policies", "shortv", "--samples", "2",
                 "--split", "test", "--out", str(out)]) == 0
    assert "choosing on the test split" in capsys.readouterr().err


def test_report_command_counts_the_flops_headline_from_the_plan(probe_dir, tmp_path):
    plan = EfficiencyPlan.from_layers(12, [2, 3, 4, 7, 9, 10, 11]).save(tmp_path / "plan.json")
    assert main(["report", "--probes", str(probe_dir), "--plan", str(plan), "--out", str(tmp_path / "r")]) == 0
    from analyses.measuring.flops import flops_figures, load_config
    from analyses.measuring.tokens import resolve_token_counts

    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    expected = flops_figures(load_config("default"), EfficiencyPlan.load(plan), resolve_token_counts("default")[0])
    assert summary["decoder_flops_ratio"] == pytest.approx(expected["decoder_flops_ratio"])
    markup = (tmp_path / "r" / "index.html").read_text()
    assert "not counted" not in markup and f"{expected['decoder_flops_ratio']:.0%} of original" in markup
    assert "MFLOPs" in markup or "GFLOPs" in markup


def test_zoo_models_are_named_zoo_name_everywhere(tmp_path, capsys):
    """``load_zoo("default")`` is the embedded model, ``--model zoo:default`` names it on the CLI, and an
    unknown zoo name is refused naming the zoo's models."""
    from eemllm_models import load_checkpoint, load_default, load_zoo

    zoo_model, _ = load_zoo("default")
    default_model, _ = load_default()
    assert all(torch.equal(a, b) for a, b in zip(zoo_model.state_dict().values(), default_model.state_dict().values()))
    assert type(load_checkpoint("zoo:default")[0]) is type(default_model)
    assert main(["flops", "--model", "zoo:default", "--plan", "shortv:llava-1.5-7b"]) == 2  # a 32-layer plan
    capsys.readouterr()
    assert main(["flops", "--model", "zoo:default"]) == 0
    assert "17 text + 100 visual" in capsys.readouterr().out  # the embedded model's own prompts
    assert main(["probe", "--model", "zoo:nope", "--samples", "1", "--out", str(tmp_path / "p")]) == 2
    assert "no zoo model 'nope'; the zoo holds zoo:default, zoo:smollm2-shapes" in capsys.readouterr().err
    assert main(["demo", "--model", "llava-hf/llava-1.5-7b-hf", "--out", str(tmp_path / "d")]) == 2
    assert "the demo runs a zoo model" in capsys.readouterr().err
