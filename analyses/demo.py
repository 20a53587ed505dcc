"""The main job on the embedded default model: what ``eemllm demo`` runs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import xarray as xr

import probes
from eemllm_models import generate_answers, load_default, load_shapes_vqa
from eemllm_models.files import atomic_write, atomic_write_text
from eemllm_models.zoo import shapes_vqa


def run_demo(out: Path, n: int = 28, seed: int = 0, batch_size: int = 14, probe_samples: int = 16
             ) -> tuple[pd.DataFrame, xr.Dataset]:
    """Answer ``n`` shapes-vqa test questions with the default model's ``generate()``, then probe it.

    Writes ``out/demo_answers.csv`` (one row per question), ``out/demo_summary.json`` (accuracy
    overall and per question type, with each type's chance level) and ``out/lc.nc`` (Layer
    Contribution of every layer for visual and text tokens on ``probe_samples`` train-split
    prompts). Returns the per-question frame (columns ``id, qtype, question, answer,
    prediction, correct``) and the Layer Contribution result.
    """
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    if probe_samples < 1:
        raise ValueError(f"--probe-samples must be at least 1, got {probe_samples}")
    model, processor = load_default()
    data = load_shapes_vqa("test", n=n, seed=seed)
    predictions = generate_answers(model, processor, data["image"], data["question"], batch_size=batch_size)
    frame = pd.DataFrame({
        "id": data["id"], "qtype": data["qtype"], "question": data["question"],
        "answer": data["answer"], "prediction": predictions,
    })
    frame["correct"] = [shapes_vqa.exact_match(p, a) for p, a in zip(frame.prediction, frame.answer)]
    accuracy = shapes_vqa.accuracy(frame.qtype, frame.prediction, frame.answer)
    summary = {
        "model": "eemllm default (embedded)", "split": "test", "n": n, "seed": seed,
        "accuracy": accuracy, "chance": {q: shapes_vqa.CHANCE[q] for q in accuracy if q != "overall"},
    }
    atomic_write(out / "demo_answers.csv", lambda tmp: frame.to_csv(tmp, index=False))
    atomic_write_text(out / "demo_summary.json", json.dumps(summary, indent=1) + "\n")
    lc = probes.layer_contribution(model, processor, load_shapes_vqa("train", n=400, seed=seed),
                                   samples=probe_samples, seed=seed)
    probes.save_result(lc, out / "lc.nc")
    return frame, lc
