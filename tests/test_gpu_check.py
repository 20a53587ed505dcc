"""The prepared GPU check's CPU dry run: every step runs and writes its files (the figures mean nothing on a CPU)."""

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_gpu_check_cpu_smoke_runs_every_step(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": os.environ.get("PYTHON", "python")}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(result["steps"]) == {"environment", "cuda_tests", "prefill", "decode", "profile"}
    assert not [name for name, step in result["steps"].items() if "error" in step or "skipped" in step]
    plans = {row["plan"] for row in result["prefill"]}
    assert {"original", "empty", "shortv:llava-1.5-7b", "naavit", "naavit-flex", "composite", "mix"} <= plans
    assert {row["plan"] for row in result["decode"]} == {"original", "shortv:llava-1.5-7b", "naavit"}
    assert {t["target"] for t in result["targets"]} == {"frozen_of_ideal", "visual_modes_of_ideal", "empty_overhead",
                                                        "baseline_of_matmul_peak"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.csv", "gpu_check.json", "gpu_check.log",
                                                          "profile.txt"]
