import json
import os
import subprocess
import sys

from analyses.cli import main


def test_demo_command_answers_and_reports_accuracy(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(["eemllm", "demo", "--out", str(out), "--n", "14"], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert "overall:" in result.stdout
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["n"] == 14 and 0 <= summary["accuracy"]["overall"] <= 1
    assert len((out / "demo_answers.csv").read_text().splitlines()) == 15


def test_bad_argument_is_a_clear_error(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--n", "0"]) == 2
    assert "--n must be at least 1" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_module_runs_as_a_script():
    result = subprocess.run([sys.executable, "-m", "analyses.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "demo" in result.stdout
