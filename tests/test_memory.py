"""Memory stays flat in the number of samples: ``eemllm latency``/``evaluate --samples 100000`` stream their
prompts (generated, and their images decoded, one batch at a time) instead of materialising them.

Each command runs for a few tens of seconds in a subprocess whose resident size is sampled; it is then
stopped (a full run would take hours): what matters is that memory stays flat while it runs.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

LIMIT_BYTES = 2 * 2**30
RUN_SECONDS = 40


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _run_and_sample(command: list[str], cwd: Path) -> tuple[int, str]:
    """Run ``command`` for RUN_SECONDS (or until it ends), sampling its RSS; return the peak and its stderr."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log = cwd / "stderr.txt"
    with log.open("w") as err:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=cwd)
        peak, end = 0, time.monotonic() + RUN_SECONDS
        try:
            while time.monotonic() < end and process.poll() is None:
                try:
                    peak = max(peak, _rss(process.pid))
                except (FileNotFoundError, ProcessLookupError):
                    break
                time.sleep(0.2)
        finally:
            process.kill()
            process.wait()
    return peak, log.read_text()


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the resident size from /proc")
@pytest.mark.parametrize("command, bar", [
    (["latency", "--plan", "PLAN", "--samples", "100000", "--warmup", "0", "--repeats", "1", "--new-tokens", "2"],
     "/25000"),  # 12,500 batches of 8 prompts, two variants
    (["evaluate", "--samples", "100000", "--batch-size", "8", "--max-new-tokens", "1"], "/100000"),
])
def test_a_hundred_thousand_samples_stream_in_flat_memory(tmp_path, command, bar):
    from eemllm_models import EfficiencyPlan

    plan = EfficiencyPlan.from_layers(12, [10, 11]).save(tmp_path / "plan.json")
    command = [str(plan) if part == "PLAN" else part for part in command]
    peak, stderr = _run_and_sample([sys.executable, "-m", "analyses.cli", *command, "--out", str(tmp_path / "out")],
                                   tmp_path)
    assert "Traceback" not in stderr, stderr[-3000:]
    assert bar in stderr, f"the progress bar with its total never showed:\n{stderr[-2000:]}"
    assert peak < LIMIT_BYTES, f"peak RSS {peak / 2**30:.2f} GiB"
