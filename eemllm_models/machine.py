"""What machine a measurement ran on, for training logs and benchmark tables."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU's model name (from ``/proc/cpuinfo`` where there is one)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_runs_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (oneDNN's own test: AVX-512 or AMX). On one
    without (AVX2 only) bf16 autocast emulates them, and a training step takes many times as long as in fp32."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def describe() -> str:
    """``"<CPU>, N threads, torch X"`` plus the GPU's name when CUDA is available."""
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}{gpu}"
