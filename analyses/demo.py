"""The main job on the embedded default model: what ``eemllm demo`` runs.

Answer shapes-vqa test questions; probe the Layer Contribution, attention statistics and mode
contributions; choose a ShortV plan; count its FLOPs; answer the same questions with the plan
applied; measure accuracy against FLOPs for the policies and the frozen-text control; put layer-level
and token-level methods side by side at half the FLOPs (ShortV, NAAViT, composite, VTW, FastV, the budget
mix: :mod:`analyses.choosing.methods`); measure latency; save the pruned model and write the redundancy
report.

Three disjoint sets of questions (checked by id): the probes measure on ``train`` prompts, the
policy comparison (what a choice of policy and k rests on) answers ``validation`` questions, and
the final original-vs-pruned accuracy is reported on ``test`` questions that nothing chose on.
The FLOPs figures are counted for the mean prompt of those test questions (``analyses.measuring.tokens``),
and ``plan.json`` records that prompt, so ``eemllm flops --model default --plan plan.json`` prints
the same ratio.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets
import pandas as pd
import xarray as xr

import probes
from eemllm_models import EfficiencyPlan, load_shapes_vqa, load_zoo, save_pruned
from eemllm_models.files import atomic_write, atomic_write_json
from eemllm_models.zoo import shapes_vqa, zoo_name

from analyses.choosing.compare import compare_policies
from analyses.choosing.methods import method_plans, method_table
from analyses.evaluating.evaluate import answer_frame, scores
from analyses.measuring.flops import flops_figures, flops_provenance
from analyses.choosing.heldout import check_disjoint, describe
from analyses.measuring.latency import measure_latency
from analyses.choosing.policies import freeze_plan
from analyses.reporting.report import ReportInputs, write_report
from analyses.measuring.tokens import dataset_token_counts, describe_rows

SHORTV_SHARE = 0.6
"""Share of layers the demo freezes: ShortV froze 19 of 32 (LLaVA-1.5-7B) and 24 of 40 (13B)."""
COMPARED_SHARES = (0.25, 5 / 12, 7 / 12, 0.75)
"""Shares of the layers frozen where the demo compares the policies (3, 5, 7 and 9 of the default's 12)."""
METHODS_TARGET = 0.5
"""Decoder prefill FLOPs share at which the demo compares layer-level and token-level methods."""


def compared_ks(n_layers: int) -> tuple[int, ...]:
    """Numbers of frozen layers at which the demo compares the policies: :data:`COMPARED_SHARES` of ``n_layers``."""
    return tuple(sorted({max(1, round(share * n_layers)) for share in COMPARED_SHARES}))


@dataclass(frozen=True)
class DemoResult:
    """What the demo measured: per-question answers of the original and the pruned model, the
    Layer Contribution, the plan, its decoder FLOPs ratio, the policy comparison, the latency
    table, the report's ``index.html``, what the answers were scored on (``dataset``, ``split``, ``n``) and the
    methods compared at equal FLOPs (:func:`analyses.choosing.methods.method_table`)."""

    answers: pd.DataFrame
    lc: xr.Dataset
    plan: EfficiencyPlan
    flops_ratio: float
    comparison: pd.DataFrame
    latency: pd.DataFrame
    report: Path
    evaluation: dict
    methods: pd.DataFrame


@dataclass(frozen=True)
class DemoSizes:
    """How many prompts the demo probes on (train) and compares the policies on (validation), the random
    policy's seeds, and the latency run's test prompts (one batch) and timed repeats (after one warm-up)."""

    probe_samples: int
    compare_samples: int
    random_seeds: tuple[int, ...] = (0, 1, 2)
    latency_prompts: int = 8
    latency_repeats: int = 5


DEMO_SIZES = {"default": DemoSizes(probe_samples=96, compare_samples=42),
              "smollm2-shapes": DemoSizes(probe_samples=8, compare_samples=14, random_seeds=(0,),
                                          latency_prompts=4, latency_repeats=3)}
"""Each zoo model's demo sizes. The default's 96 probe samples give a stable choice (BENCHMARKS.md).
smollm2-shapes has 24 times the decoder FLOPs per token and 2.5 times the layers for the LC sweep to
ablate, so its demo probes, compares and times a few prompts to finish in about three minutes on two CPU
cores (an Intel Xeon; BENCHMARKS.md): its report's intervals are wide and its verdicts mostly "not resolved at this n", and it shows what
the small probe costs in selection stability. ``benchmarks/smollm2_shapes.sh`` measures the same claims at
sizes that resolve them (BENCHMARKS.md)."""


def demo_sets(n: int = 28, compare_samples: int = 42, seed: int = 0
              ) -> tuple[datasets.Dataset, datasets.Dataset, datasets.Dataset]:
    """The demo's three sets of shapes-vqa questions: ``(evaluation, selection, calibration)``.

    ``evaluation``: ``n`` test questions, the final original-vs-pruned score; ``selection``:
    ``compare_samples`` validation questions, the policy comparison; ``calibration``: 400 train
    prompts the probes draw their samples from. Checked to share no row with the evaluation set
    (``analyses.choosing.heldout.check_disjoint``).
    """
    evaluation = load_shapes_vqa("test", n=n, seed=seed)
    selection = load_shapes_vqa("validation", n=compare_samples, seed=seed)
    calibration = load_shapes_vqa("train", n=400, seed=seed)
    for chosen_on in (selection, calibration):
        check_disjoint(chosen_on, evaluation)
    return evaluation, selection, calibration


def run_demo(out: Path, n: int = 28, seed: int = 0, batch_size: int = 14, probe_samples: int | None = None,
             compare_samples: int | None = None, overwrite: bool = False, model_name: str = "default") -> DemoResult:
    """Run the demo of zoo model ``model_name`` (``default``: the embedded one; see
    :func:`eemllm_models.load_zoo`) on ``n`` shapes-vqa test questions and write its files to ``out``.

    Files: ``demo_answers.csv`` (one row per question: answer, original and pruned prediction),
    ``demo_summary.json`` (accuracy per type, original and pruned, with the split and number of
    questions of every set used, chance levels, plan, FLOPs and the prompt they were counted for),
    ``lc.nc``, ``attention.nc``, ``mode_contribution.nc`` (probes on ``probe_samples`` train-split
    prompts), ``plan.json``, ``comparison.csv`` (accuracy vs FLOPs of the policies on
    ``compare_samples`` validation questions; both default to the model's :data:`DEMO_SIZES`),
    ``withdrawal.nc`` (the withdrawal contribution, same prompts) and ``methods.csv`` (layer-level and token-level
    methods at :data:`METHODS_TARGET` of the FLOPs, on the same test questions), ``latency.csv`` (the original,
    the pruned model and every method, side by side, on the first test prompts: the model's :data:`DEMO_SIZES`),
    ``pruned-model/`` (reloads with ``eemllm_models.load_pruned``) and ``report/`` (open ``report/index.html``).
    An existing pruned model or report is replaced only with ``overwrite``.
    """
    name = zoo_name(model_name) or model_name
    sizes = DEMO_SIZES.get(name, DEMO_SIZES["default"])
    probe_samples = sizes.probe_samples if probe_samples is None else probe_samples
    compare_samples = sizes.compare_samples if compare_samples is None else compare_samples
    for option, value in (("--n", n), ("--probe-samples", probe_samples), ("--compare-samples", compare_samples)):
        if value < 1:
            raise ValueError(f"{option} must be at least 1, got {value}")
    for existing in (out / "pruned-model", out / "report"):
        if existing.exists() and not overwrite:
            raise FileExistsError(f"{existing} already exists; choose another --out or pass --overwrite")
    model, processor = load_zoo(model_name)
    label = "eemllm default (embedded)" if name == "default" else f"zoo:{name}"
    data, selection, calibration = demo_sets(n, compare_samples, seed)
    frame = answer_frame(model, processor, data, batch_size=batch_size)
    common = dict(samples=probe_samples, seed=seed)
    lc, modes = probes.layer_and_mode_contribution(model, processor, calibration, **common)
    attention = probes.attention_statistics(model, processor, calibration, **common)
    withdrawal = probes.withdrawal_contribution(model, processor, calibration, **common)
    tokens = dataset_token_counts(model, processor, data)
    plan = freeze_plan(lc, round(SHORTV_SHARE * lc.sizes["layer"]), "shortv")
    plan = plan.with_provenance(**flops_provenance(model.config, plan, tokens, describe_rows(data)))
    pruned = answer_frame(model, processor, data, plan=plan, batch_size=batch_size, progress=False)
    frame["pruned_prediction"], frame["pruned_correct"] = pruned.prediction, pruned.correct
    flops = flops_figures(model.config, plan, tokens)
    ratio = flops["decoder_flops_ratio"]
    if "prefill_flops_original" in flops:  # the names earlier summaries used
        flops.update(prefill_gflops_original=flops["prefill_flops_original"] / 1e9,
                     prefill_gflops_pruned=flops["prefill_flops_pruned"] / 1e9)
    comparison = compare_policies(model, processor, selection, lc, compared_ks(lc.sizes["layer"]), tokens,
                                  seeds=sizes.random_seeds, batch_size=batch_size, evaluation=data)
    methods = method_plans(lc, modes, withdrawal, model.config, tokens, METHODS_TARGET)
    prompts = sizes.latency_prompts
    latency = measure_latency(model, processor, data["image"][:prompts], data["question"][:prompts],
                              {"original": None, "pruned": plan, **methods}, warmup=1, repeats=sizes.latency_repeats)
    method_frame = method_table(model, processor, data, frame, methods, tokens, latency, METHODS_TARGET,
                                batch_size=batch_size)
    summary = {
        "model": label, "split": "test", "n": n, "seed": seed,
        "accuracy": scores(frame), "pruned_accuracy": scores(pruned),
        "evaluation": {**describe(data), "seed": seed},
        "selection": {**describe(selection), "seed": seed, "used_for": "policy comparison"},
        "probe": {**describe(calibration), "samples": probe_samples, "seed": seed},
        "chance": {q: shapes_vqa.CHANCE[q] for q in sorted(set(frame.qtype))},
        "plan": plan.to_dict(), **flops, "flops_convention": "shortv", "prefill_flops_convention": "full",
        "tokens": {**tokens.to_dict(), "source": describe_rows(data)},
    }
    atomic_write(out / "demo_answers.csv", lambda tmp: frame.to_csv(tmp, index=False))
    atomic_write_json(out / "demo_summary.json", summary)
    for name, result in (("lc", lc), ("attention", attention), ("mode_contribution", modes),
                         ("withdrawal", withdrawal)):
        probes.save_result(result, out / f"{name}.nc")
    plan.save(out / "plan.json")
    atomic_write(out / "comparison.csv", lambda tmp: comparison.to_csv(tmp, index=False))
    atomic_write(out / "latency.csv", lambda tmp: latency.to_csv(tmp, index=False))
    atomic_write(out / "methods.csv", lambda tmp: method_frame.to_csv(tmp, index=False))
    save_pruned(model, plan, out / "pruned-model", processor=processor, overwrite=overwrite)
    inputs = ReportInputs(lc=lc, plan=plan, attention=attention, modes=modes, comparison=comparison, latency=latency,
                          scores={"original": summary["accuracy"], "pruned": summary["pruned_accuracy"]},
                          answers=frame, flops=flops, pruned_model=out / "pruned-model",
                          title=f"Redundancy report: {label} on shapes-vqa",
                          evaluation=summary["evaluation"], methods=method_frame)
    report = write_report(inputs, out / "report", overwrite=overwrite)
    return DemoResult(frame, lc, plan, ratio, comparison, latency, report, summary["evaluation"], method_frame)
