"""The project's one prepared GPU run: every GPU figure in one command, within a time budget.

``bash benchmarks/gpu_check.sh`` on a GPU machine (it installs carried wheels, then runs
``python -m analyses.measuring.gpu_check --out $OUT``); ``python -m analyses.measuring.gpu_check --cpu-smoke --out DIR``
runs the same code paths at toy size on a CPU in well under two minutes (CI does, in a test).

Steps, each timed and recorded even when one fails (a GPU lease is short: one failing step must
not cost the others' figures):

1. ``environment``: device, its capability and memory, torch/transformers/triton versions.
2. ``cuda_tests``: the CUDA-marked tests (``pytest -k cuda``: fast path == reference in bf16 with the
   documented tolerance; skipped on a CPU).
3. ``prefill``: :func:`analyses.measuring.bench_modes.time_plans` on random-weight LLaVA decoders at the paper
   configs' full width (LLaVA-1.5-7B with 1, 4 and 8 images, LLaVA-NeXT-7B's 2880 visual tokens),
   bf16 and ``sdpa``, for the empty plan, ShortV's preset, every layer ``naavit`` (gather and
   FlexAttention kernels), every layer ``composite`` and a budget-style mix (the preset's layers
   frozen, every other layer ``naavit``): FLOPs ratio, ideal and measured speedup (CUDA events,
   plans interleaved per round, medians), the baseline's TFLOP/s beside the measured matmul peak,
   and peak memory.
4. ``decode``: prefill and per-token decode time of greedy decoding with the KV cache, original
   against the ShortV preset and ``naavit``, interleaved.
5. ``profile``: ``torch.profiler``'s top kernels of one prefill under the frozen preset and
   under ``naavit``.
6. ``targets``: each measured figure against the issue's targets (frozen >= 0.9 of ideal,
   naavit/composite >= 0.8 of ideal at 2880 tokens and at 4-8 images, empty plan <= 2% overhead,
   baseline >= 50% of the matmul peak).

Files under ``--out`` (at most four): ``gpu_check.json`` (everything), ``gpu_check.csv`` (the
prefill table), ``profile.txt``, and the shell script's ``gpu_check.log``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from eemllm_models import EfficiencyPlan
from eemllm_models.files import atomic_write, atomic_write_text
from eemllm_models.machine import describe
from eemllm_models.modes import flex_available

from analyses.measuring.bench_modes import matmul_peak_tflops, paper_case, profile_plan, time_plans
from analyses.measuring.latency import time_greedy


@dataclass(frozen=True)
class Size:
    """How big the run is: decoder width scale and depth (None: the config's), rounds, decoded tokens."""

    scale: float
    layers: int | None
    repeats: int
    warmup: int
    new_tokens: int
    cases: tuple[tuple[str, int], ...]


GPU = Size(scale=1.0, layers=None, repeats=10, warmup=3, new_tokens=64,
           cases=(("llava-1.5-7b", 1), ("llava-1.5-7b", 4), ("llava-1.5-7b", 8), ("llava-next-7b", 1)))
CPU_SMOKE = Size(scale=1 / 16, layers=4, repeats=2, warmup=1, new_tokens=4,
                 cases=(("llava-1.5-7b", 1), ("llava-next-7b", 1)))
TARGETS = {
    "frozen_of_ideal": 0.9,
    "visual_modes_of_ideal": 0.8,
    "empty_overhead": 0.02,
    "baseline_of_matmul_peak": 0.5,
}


def environment(device: torch.device) -> dict[str, Any]:
    """Device, versions and memory of this machine."""
    import transformers

    info: dict[str, Any] = {"machine": describe(), "torch": torch.__version__, "transformers": transformers.__version__,
                            "python": sys.version.split()[0], "device": str(device)}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", gpu_memory_gb=props.total_memory / 1e9,
                    cuda=torch.version.cuda, multiprocessors=props.multi_processor_count)
    return info


def cuda_tests(timeout_s: float) -> dict[str, Any]:
    """Run the CUDA-marked tests in a subprocess; their exit code and the end of their output."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda", "tests/test_fast_paths.py"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=Path(__file__).parents[2])
    return {"command": " ".join(command[2:]), "returncode": done.returncode,
            "tail": (done.stdout + done.stderr)[-3000:]}


def _plans(plans: dict[str, EfficiencyPlan], device: torch.device) -> tuple[dict[str, EfficiencyPlan], dict[str, str]]:
    """The case's plans plus ``naavit`` through FlexAttention (compiled on CUDA; uncompiled on a CPU,
    where compiling takes longer than the whole smoke run) and the frozen + naavit mix, and their kernels."""
    preset_name, preset = next((k, v) for k, v in plans.items() if k.startswith("shortv:"))
    mix = EfficiencyPlan(["frozen" if m == "frozen" else "naavit" for m in preset.modes],
                         {"policy": "mix", "source": f"{preset_name} frozen, every other layer naavit"})
    out = {**plans, "naavit-flex": plans["naavit"], "mix": mix}
    return out, {"naavit": "gather", "naavit-flex": "flex" if device.type == "cuda" else "flex_eager", "mix": "gather"}


def prefill(size: Size, device: torch.device, dtype: torch.dtype, deadline: float,
            log: Callable[[str], None]) -> tuple[pd.DataFrame, float, list[str]]:
    """The prefill table of every case (cases past ``deadline`` are skipped and named)."""
    peak = matmul_peak_tflops(device, dtype)
    frames, skipped = [], []
    for name, images in size.cases:
        if time.monotonic() > deadline:
            skipped.append(f"{name} x{images}")
            continue
        label, model, inputs, plans = paper_case(name, images, size.scale, size.layers, device, dtype)
        plans, kernels = _plans(plans, device)
        if not flex_available():
            plans.pop("naavit-flex")
        began = time.monotonic()
        frames.append(time_plans(label, model, inputs, plans, size.repeats, size.warmup, naavit_kernel=kernels,
                                 peak_tflops=peak))
        log(f"prefill {label}: {time.monotonic() - began:.1f} s")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return pd.concat(frames, ignore_index=True), peak, skipped


@torch.inference_mode()
def decode(size: Size, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    """Greedy decoding with the KV cache: median prefill and per-token decode ms per plan, interleaved."""
    name, images = size.cases[0]
    label, model, inputs, plans = paper_case(name, images, size.scale, size.layers, device, dtype)
    presets = {k: v for k, v in plans.items() if k.startswith("shortv:")}
    chosen = {"original": None, **presets, "naavit": plans["naavit"]}
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in chosen}
    for r in range(size.warmup + size.repeats):
        for key, plan in chosen.items():
            handle = None if plan is None else plan.applied(model)
            try:
                measured = time_greedy(model, inputs, size.new_tokens)
            finally:
                if handle is not None:
                    handle.remove()
            if r >= size.warmup:
                times[key].append(measured)
    rows = []
    for key, values in times.items():
        per_token = [d / (size.new_tokens - 1) for _, d in values]
        rows.append({"model": label, "plan": key, "new_tokens": size.new_tokens,
                     "prefill_ms": 1000 * statistics.median(p for p, _ in values),
                     "decode_ms_per_token": 1000 * statistics.median(per_token),
                     "decode_tokens_per_s": 1 / statistics.median(per_token)})
    base = rows[0]["decode_ms_per_token"]
    for row in rows:
        row["decode_speedup"] = base / row["decode_ms_per_token"]
    del model
    return rows


def profiles(size: Size, device: torch.device, dtype: torch.dtype) -> str:
    """Top kernels of one prefill of the last case under the frozen preset and under ``naavit``."""
    name, images = size.cases[-1]
    label, model, inputs, plans = paper_case(name, images, size.scale, size.layers, device, dtype)
    preset = next(v for k, v in plans.items() if k.startswith("shortv:"))
    parts = []
    for title, plan in (("frozen (ShortV preset)", preset), ("naavit", plans["naavit"])):
        parts.append(f"== {label}: {title} ==\n{profile_plan(model, inputs, plan)}")
    del model
    return "\n\n".join(parts)


def targets(table: pd.DataFrame, peak: float) -> list[dict[str, Any]]:
    """Each prefill figure the issue sets a target for: the figure, the target and whether it is met."""
    checks = []
    for _, row in table.iterrows():
        plan, model = row["plan"], row["model"]
        long_prompt = row["visual"] >= 2304  # LLaVA-NeXT's 2880 tokens, or 4-8 images of 576
        if plan.startswith("shortv:"):
            checks.append(("frozen_of_ideal", model, plan, row["of_ideal"], TARGETS["frozen_of_ideal"], ">="))
        elif plan in ("naavit", "naavit-flex", "composite") and long_prompt:
            checks.append(("visual_modes_of_ideal", model, plan, row["of_ideal"], TARGETS["visual_modes_of_ideal"],
                           ">="))
        elif plan == "empty":
            checks.append(("empty_overhead", model, plan, 1 / row["speedup"] - 1, TARGETS["empty_overhead"], "<="))
        elif plan == "original":
            checks.append(("baseline_of_matmul_peak", model, plan, row["base_tflops"] / peak,
                           TARGETS["baseline_of_matmul_peak"], ">="))
    return [{"target": t, "model": m, "plan": p, "measured": float(v), "goal": g,
             "met": bool(v >= g if op == ">=" else v <= g)} for t, m, p, v, g, op in checks]


def run(out: Path, size: Size, device: torch.device, dtype: torch.dtype, budget_s: float) -> dict[str, Any]:
    """Every step, each recorded with its seconds and error (if any); writes the files under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    deadline = started + budget_s
    result: dict[str, Any] = {"size": size.__dict__, "dtype": str(dtype).removeprefix("torch."), "steps": {}}

    def log(text: str) -> None:
        print(f"[gpu_check {time.monotonic() - started:6.1f} s] {text}", flush=True)

    def step(name: str, fn: Callable[[], Any]) -> Any:
        if time.monotonic() > deadline:
            result["steps"][name] = {"skipped": "time budget spent"}
            log(f"{name}: skipped (time budget spent)")
            return None
        began = time.monotonic()
        try:
            value = fn()
            result["steps"][name] = {"seconds": time.monotonic() - began}
            log(f"{name}: done in {time.monotonic() - began:.1f} s")
            return value
        except Exception as error:  # noqa: BLE001 - one failing step must not cost the other steps' figures
            result["steps"][name] = {"seconds": time.monotonic() - began, "error": repr(error),
                                     "traceback": traceback.format_exc()[-3000:]}
            log(f"{name}: FAILED {error!r}")
            return None

    result["environment"] = step("environment", lambda: environment(device))
    log(json.dumps(result["environment"]))
    result["cuda_tests"] = step("cuda_tests", lambda: cuda_tests(max(30.0, deadline - time.monotonic())))
    measured = step("prefill", lambda: prefill(size, device, dtype, deadline, log))
    if measured is not None:
        table, peak, skipped = measured
        result.update(prefill=table.to_dict(orient="records"), matmul_peak_tflops=peak, skipped_cases=skipped,
                      targets=targets(table, peak))
        atomic_write(out / "gpu_check.csv", lambda tmp: table.to_csv(tmp, index=False))
        shown = ["model", "plan", "flops_ratio", "ideal_speedup", "median_ms", "speedup", "of_ideal", "base_tflops",
                 "peak_memory_gb"]
        log(f"prefill, matmul peak {peak:.1f} TFLOP/s\n"
            + table[shown].to_string(index=False, float_format="{:.3f}".format))
        log("targets\n" + pd.DataFrame(result["targets"]).to_string(index=False, float_format="{:.3f}".format))
    result["decode"] = step("decode", lambda: decode(size, device, dtype))
    if result["decode"]:
        log("decode\n" + pd.DataFrame(result["decode"]).to_string(index=False, float_format="{:.3f}".format))
    text = step("profile", lambda: profiles(size, device, dtype))
    if text is not None:
        atomic_write_text(out / "profile.txt", text + "\n")
        log(text)
    result["seconds"] = time.monotonic() - started
    atomic_write_text(out / "gpu_check.json", json.dumps(result, indent=1, default=str) + "\n")
    log(f"wrote {out}/gpu_check.json in {result['seconds']:.1f} s")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json, gpu_check.csv, profile.txt")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="toy sizes on the CPU: every code path but the CUDA kernels, in well under 2 minutes")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="seconds after which the remaining steps are skipped (default 420: 7 minutes)")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        device, dtype, size = torch.device("cpu"), torch.float32, CPU_SMOKE
    elif not torch.cuda.is_available():
        parser.error("no CUDA device here: run on the GPU machine, or pass --cpu-smoke for the CPU dry run")
    else:
        device, dtype, size = torch.device("cuda"), torch.bfloat16, GPU
    result = run(args.out, size, device, dtype, args.budget_s)
    failed = [name for name, info in result["steps"].items() if "error" in info]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
