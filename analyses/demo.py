"""The main job on the embedded default model: what ``eemllm demo`` runs.

Answer shapes-vqa test questions, probe the Layer Contribution, choose a ShortV plan from it,
count its FLOPs, answer the same questions with the plan applied and save the pruned model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import xarray as xr

import probes
from eemllm_models import EfficiencyPlan, load_default, load_shapes_vqa, save_pruned
from eemllm_models.files import atomic_write, atomic_write_text
from eemllm_models.zoo import shapes_vqa

from .evaluate import answer_frame, scores
from .flops import flops_ratio
from .policies import freeze_plan
from .tokens import shapes_vqa_token_counts

SHORTV_SHARE = 0.6
"""Share of layers the demo freezes: ShortV froze 19 of 32 (LLaVA-1.5-7B) and 24 of 40 (13B)."""


@dataclass(frozen=True)
class DemoResult:
    """What the demo measured: per-question answers of the original and the pruned model, the
    Layer Contribution, the plan and its decoder FLOPs ratio."""

    answers: pd.DataFrame
    lc: xr.Dataset
    plan: EfficiencyPlan
    flops_ratio: float


def run_demo(out: Path, n: int = 28, seed: int = 0, batch_size: int = 14, probe_samples: int = 16,
             overwrite: bool = False) -> DemoResult:
    """Run the demo on ``n`` shapes-vqa test questions and write its files to ``out``.

    Files: ``demo_answers.csv`` (one row per question: answer, original and pruned prediction),
    ``demo_summary.json`` (accuracy per type, original and pruned, chance levels, plan, FLOPs
    ratio), ``lc.nc`` (Layer Contribution on ``probe_samples`` train-split prompts), ``plan.json``
    and ``pruned-model/`` (reloads with ``eemllm_models.load_pruned``; replaced only with
    ``overwrite``).
    """
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    if probe_samples < 1:
        raise ValueError(f"--probe-samples must be at least 1, got {probe_samples}")
    if (out / "pruned-model").exists() and not overwrite:
        raise FileExistsError(f"{out / 'pruned-model'} already exists; choose another --out or pass --overwrite")
    model, processor = load_default()
    data = load_shapes_vqa("test", n=n, seed=seed)
    frame = answer_frame(model, processor, data, batch_size=batch_size)
    lc = probes.layer_contribution(model, processor, load_shapes_vqa("train", n=400, seed=seed),
                                   samples=probe_samples, seed=seed)
    plan = freeze_plan(lc, round(SHORTV_SHARE * lc.sizes["layer"]), "shortv")
    pruned = answer_frame(model, processor, data, plan=plan, batch_size=batch_size, progress=False)
    frame["pruned_prediction"], frame["pruned_correct"] = pruned.prediction, pruned.correct
    ratio = flops_ratio(model.config, plan, shapes_vqa_token_counts(model, processor))
    summary = {
        "model": "eemllm default (embedded)", "split": "test", "n": n, "seed": seed,
        "accuracy": scores(frame), "pruned_accuracy": scores(pruned),
        "chance": {q: shapes_vqa.CHANCE[q] for q in sorted(set(frame.qtype))},
        "plan": plan.to_dict(), "decoder_flops_ratio": ratio,
    }
    atomic_write(out / "demo_answers.csv", lambda tmp: frame.to_csv(tmp, index=False))
    atomic_write_text(out / "demo_summary.json", json.dumps(summary, indent=1) + "\n")
    probes.save_result(lc, out / "lc.nc")
    plan.save(out / "plan.json")
    save_pruned(model, plan, out / "pruned-model", processor=processor, overwrite=overwrite)
    return DemoResult(frame, lc, plan, ratio)
