"""Metrics that do not apply are n/a: NaN in the scores, "n/a" in the report, never 0."""

import json
import math

import numpy as np
import pandas as pd
import xarray as xr

from analyses.evaluating.evaluate import scores
from analyses.choosing.policies import freeze_plan
from analyses.reporting.report import ReportInputs, write_report


def _frame(answers, predictions):
    frame = pd.DataFrame({"qtype": ["exists"] * len(answers), "answer": answers, "prediction": predictions})
    frame["correct"] = [a.lower() == p.lower() for a, p in zip(answers, predictions)]
    return frame


def test_yes_no_metrics_without_a_yes_answer_are_nan_not_zero():
    result = scores(_frame(["no", "no", "no"], ["no", "yes", "no"]))
    assert result["overall"] == 2 / 3 and result["yes_ratio"] == 1 / 3
    assert all(math.isnan(result[k]) for k in ("yes_no_precision", "yes_no_recall", "yes_no_f1"))


def test_precision_without_a_yes_prediction_is_nan_and_f1_is_zero():
    result = scores(_frame(["yes", "no"], ["no", "no"]))
    assert math.isnan(result["yes_no_precision"]) and result["yes_no_recall"] == 0.0 and result["yes_no_f1"] == 0.0
    both = scores(_frame(["yes", "yes", "no", "no"], ["yes", "no", "yes", "no"]))
    assert both["yes_no_precision"] == both["yes_no_recall"] == both["yes_no_f1"] == 0.5


def _lc(n_layers=4):
    dims = ("sample", "layer", "group")
    values = np.linspace(0.01, 1.0, 2 * n_layers * 2).reshape(2, n_layers, 2)
    return xr.Dataset({"lc": (dims, values), "cosine": (dims, np.zeros_like(values))},
                      coords={"sample": ["a", "b"], "layer": range(n_layers), "group": ["visual", "text"]},
                      attrs={"probe": "layer_contribution", "model": "m", "divergence": "kl"})


def test_the_report_shows_n_a_for_metrics_that_do_not_apply(tmp_path):
    original = scores(_frame(["no", "no"], ["no", "yes"]))
    pruned = scores(_frame(["no", "no"], ["no", "no"]))
    lc = _lc()
    inputs = ReportInputs(lc=lc, plan=freeze_plan(lc, 2), scores={"original": original, "pruned": pruned})
    out = write_report(inputs, tmp_path / "report")
    markdown = (out.parent / "report.md").read_text()
    rows = {line.split("|")[1].strip().replace("\\_", "_"): line for line in markdown.splitlines()
            if line.startswith("| yes\\_no")}
    assert set(rows) == {"yes_no_precision", "yes_no_recall", "yes_no_f1"}
    for line in rows.values():
        assert "n/a" in line and "0.0%" not in line
    assert "n/a" in out.read_text()
    summary = json.loads((out.parent / "summary.json").read_text())
    assert summary["scores"]["original"]["yes_no_f1"] is None
