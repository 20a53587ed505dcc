"""Bad input found in the newcomer run: each error names the problem and the fix, in the words of the
interface used (CLI flags on the CLI, argument names in Python)."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from analyses.cli import main
from eemllm_models import EfficiencyPlan, ModelLoadError, default_model_path, load_model
from eemllm_models.loading import looks_like_path

OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _plan(tmp_path) -> Path:
    return EfficiencyPlan.from_layers(12, [10, 11]).save(tmp_path / "plan.json")


# ----------------------------------------------------------------------------- plans

def test_a_missing_plan_file_is_not_called_an_unknown_preset(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no plan file at .*missing\.json.*known presets: shortv:llava-1\.5-7b"):
        EfficiencyPlan.resolve(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="no plan file at plans/k7"):
        EfficiencyPlan.resolve("plans/k7")
    with pytest.raises(ValueError, match="unknown preset 'shortv:nope'"):
        EfficiencyPlan.resolve("shortv:nope")
    assert EfficiencyPlan.resolve("shortv:llava-1.5-7b").n_layers == 32


def test_malformed_plan_json_names_the_file_and_the_problem(tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text('{"modes": ["full", "frozen",]}')
    with pytest.raises(ValueError, match=r"plan file .*broken\.json is not valid JSON \(.* line 1, column"):
        EfficiencyPlan.load(broken)
    assert main(["evaluate", "--plan", str(broken), "--samples", "2", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eemllm evaluate: error: plan file") and "broken.json is not valid JSON" in err
    assert "Traceback" not in err and not (tmp_path / "e").exists()
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="list.json holds a JSON list, not a plan"):
        EfficiencyPlan.load(tmp_path / "list.json")
    (tmp_path / "nomodes.json").write_text("{}")
    with pytest.raises(ValueError, match="nomodes.json is not a valid plan: .*'modes' list"):
        EfficiencyPlan.load(tmp_path / "nomodes.json")


def test_cli_missing_plan_file(tmp_path, capsys):
    assert main(["latency", "--plan", "missing.json", "--out", str(tmp_path / "l")]) == 2
    err = capsys.readouterr().err
    assert "eemllm latency: error: no plan file at missing.json" in err and "known presets: shortv:" in err


# ----------------------------------------------------------------------------- models

def test_a_missing_model_folder_is_not_tried_as_a_hub_id(tmp_path, capsys):
    for name in ("./no-such-model", "~/no-such-model-here", str(tmp_path / "gone"), "a/b/c"):
        assert looks_like_path(name)
        start = time.perf_counter()
        with pytest.raises(ModelLoadError, match="no model folder at .*pass the folder a model was saved to"):
            load_model(name)
        assert time.perf_counter() - start < 5
    (tmp_path / "models").mkdir()
    assert looks_like_path(str(tmp_path / "models" / "llava")) and not looks_like_path("llava-hf/llava-1.5-7b-hf")
    assert main(["evaluate", "--model", str(tmp_path / "gone"), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert f"eemllm evaluate: error: no model folder at {tmp_path / 'gone'}" in err
    assert "--model" in err and "--model default" in err


def test_an_uncached_hub_id_fails_in_seconds_offline(tmp_path):
    """With HF_HUB_OFFLINE=1, and without it when the hub does not answer (an endpoint that refuses)."""
    script = "from eemllm_models import load_model\nload_model('eemllm-test/not-cached')"
    cache = {"HF_HUB_CACHE": str(tmp_path / "hub")}
    for env, says in (({**OFFLINE, **cache}, "HF_HUB_OFFLINE is set"),
                      ({**_online(), **cache, "HF_ENDPOINT": "http://127.0.0.1:9"}, "set HF_HUB_OFFLINE=1")):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
        took = time.perf_counter() - start
        assert done.returncode == 1 and "ModelLoadError" in done.stderr
        assert says in done.stderr and "download it first" in done.stderr and "hf download eemllm-test/not-cached" \
            in done.stderr
        assert took < 40, f"took {took:.0f} s (import included)"  # was 143 s of retries


def test_a_cached_hub_id_loads_when_the_hub_does_not_answer(tmp_path):
    snapshot = tmp_path / "hub" / "models--eemllm-test--default" / "snapshots" / ("0" * 40)
    shutil.copytree(default_model_path(), snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    script = ("from eemllm_models import load_model\nm, p = load_model('eemllm-test/default')\n"
              "print(type(m).__name__, type(p).__name__)")
    env = {**_online(), "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "LlavaForConditionalGeneration LlavaProcessor" in done.stdout
    assert "did not answer" in done.stderr and "local HF cache only" in done.stderr


def _online() -> dict[str, str]:
    return {k: v for k, v in OFFLINE.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                           "HF_DATASETS_OFFLINE")}


# ----------------------------------------------------------------------------- arguments

@pytest.mark.parametrize("argv, message", [
    (["latency", "--plan", "PLAN", "--samples", "0"], "--samples must be at least 1, got 0"),
    (["compare", "--lc", "lc.nc", "--samples", "0"], "--samples must be at least 1, got 0"),
    (["probe", "--rows", "0"], "--rows must be at least 1, got 0"),
    (["probe", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["evaluate", "--batch-size", "-3"], "--batch-size must be at least 1, got -3"),
    (["latency", "--plan", "PLAN", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["latency", "--plan", "PLAN", "--new-tokens", "1"], "--new-tokens must be at least 2, got 1"),
    (["compare", "--lc", "lc.nc", "--ks", "3", "-1"], "--ks must be at least 0, got -1"),
    (["plan", "--lc", "lc.nc", "--k", "-2"], "--k must be at least 0, got -2"),
    (["evaluate", "--seed", "-1"], "--seed must be at least 0, got -1"),
    (["evaluate", "--device", "tpu"], "--device 'tpu' is not a device eemllm runs on; choose cpu, cuda, cuda:N"),
    (["prune", "--plan", "PLAN", "--device", "cuda:x"], "--device 'cuda:x' is not a device"),
])
def test_bad_numbers_and_devices_are_refused_by_the_parser_naming_the_flag(tmp_path, capsys, argv, message):
    argv = [str(_plan(tmp_path)) if a == "PLAN" else a for a in argv]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"eemllm {argv[0]}: error: {message}" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- writing folders

def test_prune_into_an_existing_folder_says_the_cli_flag(tmp_path, capsys):
    (tmp_path / "p").mkdir()
    assert main(["prune", "--plan", str(_plan(tmp_path)), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "already exists; choose another --out or pass --overwrite" in err and "overwrite=True" not in err


def test_overwrite_refuses_a_folder_eemllm_did_not_write(tmp_path, capsys):
    """--overwrite deleted a user's notes.txt: now only folders eemllm wrote are replaced."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["prune", "--plan", str(_plan(tmp_path)), "--out", str(mine), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"{mine} was not written by eemllm" in err and "choose another --out" in err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    pruned = tmp_path / "pruned"
    assert main(["prune", "--plan", str(_plan(tmp_path)), "--out", str(pruned)]) == 0
    assert (pruned / ".eemllm").is_file()
    (pruned / "stale.txt").write_text("left by an older run")
    assert main(["prune", "--plan", str(_plan(tmp_path)), "--out", str(pruned), "--overwrite"]) == 0
    assert not (pruned / "stale.txt").exists() and (pruned / "model.safetensors").is_file()


def test_report_latency_must_be_the_latency_csv(tmp_path, capsys):
    (tmp_path / "x.json").write_text('{"prefill_ms": 3}')
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    for given in ("x.json", "other.csv"):
        assert main(["report", "--probes", str(tmp_path), "--latency", str(tmp_path / given),
                     "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert f"--latency {tmp_path / given} is not the table `eemllm latency` writes" in err
        assert "pass latency.csv that `eemllm latency --out DIR` writes" in err and "Traceback" not in err
    assert main(["report", "--probes", str(tmp_path), "--latency", str(tmp_path / "none.csv"),
                 "--out", str(tmp_path / "r")]) == 2
    assert "--latency" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_flops_of_a_naavit_and_composite_plan_is_counted_not_a_python_error(tmp_path, capsys):
    plan = EfficiencyPlan.from_layers(12, {3: "naavit", 5: "composite", 6: "frozen"}).save(tmp_path / "nv.json")
    assert main(["flops", "--model", "default", "--plan", str(plan)]) == 0
    out = capsys.readouterr().out
    assert "(frozen 6; naavit 3; composite 5)" in out and "plan_flops" not in out


def test_real_bugs_keep_their_traceback(tmp_path):
    """Only input errors become one line: a TypeError inside the toolkit is not hidden."""
    code = ("import sys, analyses.cli as c\n"
            "def boom(args): raise TypeError('a real bug')\n"
            "p = c.build_parser\n"
            "def build():\n"
            "    parser = p(); parser.set_defaults(run=boom)\n"
            "    for action in parser._subparsers._group_actions[0].choices.values(): action.set_defaults(run=boom)\n"
            "    return parser\n"
            "c.build_parser = build\n"
            "sys.exit(c.main(['flops', '--model', 'default']))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=OFFLINE, timeout=120)
    assert done.returncode == 1 and "Traceback" in done.stderr and "TypeError: a real bug" in done.stderr


# ----------------------------------------------------------------------------- Ctrl-C and resuming

def _interrupt_when(command: list[str], ready, cwd: Path, limit: float = 240) -> subprocess.CompletedProcess:
    """Start ``command``, send it SIGINT (Ctrl-C) once ``ready()`` holds, and wait for it to end."""
    log = cwd / "stderr.txt"
    with log.open("w") as err:
        # SIG_DFL in the child: a test run started in the background (`pytest &`, nohup) has SIGINT ignored, which
        # children inherit, and Python then installs no Ctrl-C handler, so the interrupt would never arrive
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True, env=OFFLINE, cwd=cwd,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        end = time.monotonic() + limit
        while not ready() and process.poll() is None and time.monotonic() < end:
            time.sleep(0.1)
        assert process.poll() is None, f"ended before it could be interrupted:\n{log.read_text()[-3000:]}"
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=120)
    return subprocess.CompletedProcess(command, process.returncode, out, log.read_text())


def test_ctrl_c_prints_one_line_and_a_probe_resumes_from_its_checkpoint(tmp_path):
    checkpoint = tmp_path / "ck"
    command = [sys.executable, "-m", "analyses.cli", "probe", "--probes", "lc", "--samples", "16", "--batch-size", "2",
               "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]
    stopped = _interrupt_when(command, lambda: any((checkpoint / "lc").glob("batch-*.nc")), tmp_path)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == \
        "eemllm probe: interrupted; rerun with the same --checkpoint to resume"
    saved = len(list((checkpoint / "lc").glob("batch-*.nc")))
    assert 1 <= saved < 8
    resumed = subprocess.run(command, capture_output=True, text=True, env=OFFLINE, cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"probe layer_contribution: resuming at batch {saved + 1} of 8 ({saved} saved in" in resumed.stderr
    assert (tmp_path / "out" / "lc.nc").is_file()


def test_ctrl_c_without_a_checkpoint_just_says_interrupted(tmp_path):
    command = [sys.executable, "-m", "analyses.cli", "latency", "--plan", str(_plan(tmp_path)), "--samples", "4000",
               "--batch-size", "2", "--warmup", "0", "--repeats", "1", "--new-tokens", "2",
               "--out", str(tmp_path / "out")]
    stopped = _interrupt_when(command, lambda: "batch/s" in (tmp_path / "stderr.txt").read_text(), tmp_path)
    assert stopped.returncode == 130 and "Traceback" not in stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1].endswith("eemllm latency: interrupted")
    assert not (tmp_path / "out").exists()


def test_evaluate_refuses_to_score_a_plan_on_the_split_it_was_chosen_on(tmp_path, capsys):
    plan = EfficiencyPlan.from_layers(12, [9, 10, 11], "frozen", policy="greedy",
                                      selection={"dataset": "shapes-vqa", "split": "validation", "n": 70})
    path = plan.save(tmp_path / "plan.json")
    out = ["--samples", "2", "--batch-size", "2"]
    assert main(["evaluate", "--plan", str(path), "--split", "validation", *out, "--out", str(tmp_path / "a")]) == 2
    error = capsys.readouterr().err
    assert "chosen on 70 questions of shapes-vqa validation" in error and "--allow-overlap" in error
    assert not (tmp_path / "a" / "scores.json").exists()
    with pytest.warns(UserWarning, match="chosen on 70 questions"):
        assert main(["evaluate", "--plan", str(path), "--split", "validation", "--allow-overlap", *out,
                     "--out", str(tmp_path / "b")]) == 0
    assert main(["evaluate", "--plan", str(path), *out, "--out", str(tmp_path / "c")]) == 0  # test: held out


def test_latency_of_a_pruned_model_compares_its_plan_with_the_same_weights(tmp_path, capsys):
    assert main(["prune", "--plan", str(_plan(tmp_path)), "--out", str(tmp_path / "p")]) == 0
    args = ["--samples", "2", "--new-tokens", "2", "--warmup", "0", "--repeats", "1"]
    assert main(["latency", "--model", str(tmp_path / "p"), *args, "--out", str(tmp_path / "l")]) == 0
    assert "planned" in (tmp_path / "l" / "latency.csv").read_text()
    assert main(["latency", *args, "--out", str(tmp_path / "m")]) == 2
    assert "pass --plan" in capsys.readouterr().err


def test_flops_with_an_uncached_hub_id_fails_in_seconds_when_the_hub_does_not_answer(tmp_path):
    env = {**_online(), "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "analyses.cli", "flops", "--model", "eemllm-test/not-cached"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "no model config 'eemllm-test/not-cached'" in done.stderr
    assert time.perf_counter() - start < 40
