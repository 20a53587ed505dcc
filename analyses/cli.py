"""``eemllm``: the command-line face of the toolkit (a thin layer over the library functions)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from eemllm_models.zoo import shapes_vqa


def _demo(args: argparse.Namespace) -> int:
    from eemllm_models.files import ForeignFolderError, replaceable

    from eemllm_models.zoo import zoo_name

    from analyses.choosing.compare import random_seeds_label
    from .demo import run_demo

    if zoo_name(args.model) is None:
        raise ValueError(f"--model {args.model}: the demo runs a zoo model (--model zoo:default); for your own "
                         "checkpoint run eemllm probe, plan and evaluate with --model DIR")
    for folder in (args.out / "pruned-model", args.out / "report"):  # refused now, not after the whole run
        if args.overwrite and not replaceable(folder):
            raise ForeignFolderError(folder)

    result = run_demo(args.out, n=args.n, seed=args.seed, probe_samples=args.probe_samples,
                      compare_samples=args.compare_samples, overwrite=args.overwrite,
                      model_name=zoo_name(args.model))
    frame = result.answers
    print(frame[["qtype", "question", "answer", "prediction", "pruned_prediction"]]
          .assign(question=frame.question.str.split("\n").str[0]).to_string(index=False))
    print()
    _print_lc(result.lc)
    print()
    frozen = sorted(result.plan.layers("frozen"))
    print(f"ShortV plan: freeze visual tokens in layers {frozen}; decoder FLOPs {result.flops_ratio:.0%} of the original")
    _print_accuracies(frame, result.evaluation)
    print()
    table = result.comparison.groupby(["k", "policy"], sort=False).agg(
        flops=("flops_ratio", "mean"), accuracy=("accuracy", "mean")).unstack("policy")["accuracy"]
    compared = result.comparison.iloc[0]
    print(f"accuracy by number of frozen layers on {compared.n} {compared.split} questions "
          f"({random_seeds_label(result.comparison)}; text: text tokens frozen instead):")
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    claims = json.loads((result.report.parent / "summary.json").read_text())["claims"]
    for claim in claims.values():
        print(f"claim {claim['claim']!r}: {claim['verdict']}")
    latency = result.latency.set_index("variant")
    noisy = "; noisy: interval includes 1.0 or repeats spread > 10%" if latency.noisy["pruned"] else ""
    print(f"prefill {latency.prefill_ms['original']:.0f} ms -> {latency.prefill_ms['pruned']:.0f} ms "
          f"({latency.prefill_speedup['pruned']:.2f}x, 95% interval {latency.prefill_speedup_low['pruned']:.2f}-"
          f"{latency.prefill_speedup_high['pruned']:.2f}x over {latency.repeats['pruned']} paired runs{noisy})")
    methods = result.methods
    print(f"methods at {methods.target.iloc[0]:.0%} of the decoder FLOPs, on the same {methods.n.iloc[0]} test "
          "questions (change in points, 95% paired interval; prefill speedup, FLOPs-ideal in brackets):")
    for row in methods.iloc[1:].itertuples():
        print(f"  {row.method:<9} {100 * row.difference:+6.1f} [{100 * row.difference_low:+.1f}, "
              f"{100 * row.difference_high:+.1f}]  {row.prefill_speedup:.2f}x ({row.ideal_prefill_speedup:.2f}x)  "
              f"{row.plan}")
    print(f"wrote {args.out}: report/index.html, pruned-model/, plan.json, the probes' .nc files, "
          "comparison.csv, methods.csv, latency.csv, demo_answers.csv, demo_summary.json")
    return 0


def _print_scores(frame, result: dict) -> None:
    """Accuracy per question type with n and its interval, then the data set's other metrics (n/a where
    a metric does not apply)."""
    from analyses.evaluating.accuracy import accuracy_table
    from analyses.reporting.page import format_value

    table = accuracy_table(frame)
    print(f"accuracy on {len(frame)} questions, {table.level.iloc[0]:.0%} {table.method.iloc[0]} intervals:")
    for row in table.itertuples(index=False):
        print(f"{row.qtype:>17}: {row.accuracy:.3f} [{row.low:.3f}, {row.high:.3f}]  (n={row.n})")
    for name, value in result.items():
        if name not in set(table.qtype):
            print(f"{name:>17}: {format_value(value, '{:.3f}'.format)}")


def _print_accuracies(frame, evaluation: dict) -> None:
    """Accuracy per question type, original and pruned, each with n and its Wilson interval, and the
    paired pruned-minus-original difference with its interval and McNemar's p."""
    from analyses.evaluating.accuracy import accuracy_table, paired_table

    original, pruned = accuracy_table(frame), accuracy_table(frame, "pruned_correct")
    paired = paired_table(frame).set_index("qtype")
    level = f"{original.level.iloc[0]:.0%}"
    print(f"accuracy on {evaluation['n']} {evaluation['dataset']} {evaluation['split']} questions "
          f"(no choice saw them), with {level} intervals:")
    print(f"{'':>9}  {'n':>3}  {'original':>21}  {'pruned':>21}  {'pruned - original, points':>27}  chance")
    for (_, a), (_, b) in zip(original.iterrows(), pruned.iterrows()):
        d = paired.loc[a.qtype]
        chance = f"{shapes_vqa.CHANCE[a.qtype]:5.0%}" if a.qtype in shapes_vqa.CHANCE else ""
        verdict = "" if d.resolved else " (not resolved)"
        print(f"{a.qtype:>9}: {a.n:>3}  {a.accuracy:6.1%} [{a.low:5.1%}, {a.high:6.1%}]  "
              f"{b.accuracy:6.1%} [{b.low:5.1%}, {b.high:6.1%}]  "
              f"{100 * d.difference:+5.1f} [{100 * d.low:+5.1f}, {100 * d.high:+5.1f}]{verdict:>15}  {chance}")
    print()


def _print_lc(lc) -> None:
    """The mean Layer Contribution per layer and group, and how often visual is below text."""
    table = lc.lc.mean("sample").to_pandas()
    level = f"{lc.lc_low.attrs.get('interval_level', 0.95):.0%}"
    shown = pd.DataFrame({f"{g} {column}": values[g] for g in table.columns
                          for column, values in (("mean", table), ("low", lc.lc_low.to_pandas()),
                                                 ("high", lc.lc_high.to_pandas()))})
    print(f"Layer Contribution ({lc.attrs['divergence']}, nats, mean over {lc.sizes['sample']} samples, "
          f"{level} bootstrap interval):")
    print(shown.to_string(float_format=lambda v: f"{v:.4f}"))
    below = int((table.visual < table.text).sum())
    print(f"visual LC below text LC in {below} of {len(table)} layers")


PROBE_FILES = {"lc": "lc.nc", "modes": "mode_contribution.nc", "attention": "attention.nc"}


def _probe(args: argparse.Namespace) -> int:
    import probes
    from eemllm_models import load_shapes_vqa

    unknown = sorted(set(args.probes) - set(PROBE_FILES))
    if unknown:
        raise ValueError(f"unknown probe(s) {unknown}; choose from {sorted(PROBE_FILES)}")
    if args.data is not None:
        needed = [("--image-column", args.image_column), ("--question-column", args.question_column)]
        if args.positions == "answer":
            needed.append(("--answer-column", args.answer_column))
        data, where = _user_data(args, needed), str(args.data)
    else:
        data, where = load_shapes_vqa(args.split, n=args.rows), f"shapes-vqa {args.split} (--rows {args.rows})"
    if args.samples > len(data):
        raise ValueError(f"--samples {args.samples} is more than the {len(data)} rows of {where}; lower --samples"
                         + ("" if args.data is not None else " or raise --rows"))
    model, processor = _load(args)
    common = dict(samples=args.samples, seed=args.seed, batch_size=args.batch_size, image_column=args.image_column,
                  question_column=args.question_column, answer_column=args.answer_column)
    contribution = dict(divergence=args.divergence, positions=args.positions, **common)
    both = {"lc", "modes"} <= set(args.probes)
    written: set[str] = set()
    for name in args.probes:
        if name in written:
            continue
        pair = both and name in ("lc", "modes")  # one pass serves both (its frozen column is the visual LC)
        checkpoint = None if args.checkpoint is None else args.checkpoint / ("lc-modes" if pair else name)
        if pair:
            computed = dict(zip(("lc", "modes"), probes.layer_and_mode_contribution(
                model, processor, data, checkpoint=checkpoint, **contribution)))
        elif name == "lc":
            computed = {name: probes.layer_contribution(model, processor, data, checkpoint=checkpoint, **contribution)}
        elif name == "modes":
            computed = {name: probes.mode_contribution(model, processor, data, checkpoint=checkpoint, **contribution)}
        else:
            computed = {name: probes.attention_statistics(model, processor, data, checkpoint=checkpoint, **common)}
        for done, result in computed.items():
            written.add(done)
            if _is_main_process():
                path = probes.save_result(result, args.out / PROBE_FILES[done])
                print(f"wrote {path}")
                if done == "lc":
                    _print_lc(result)
    return 0


def _user_data(args: argparse.Namespace, needed: list[tuple[str, str]]):
    """The data set at ``--data`` (``--split`` of a multi-split folder), refused unless it has the ``needed``
    columns (``(flag, column)`` pairs: the message names the flag that renames it)."""
    from analyses.evaluating.benchmarks import load_local_dataset

    data = load_local_dataset(args.data, image_column=args.image_column, split=args.split)
    for flag, column in needed:
        if column not in data.column_names:
            raise ValueError(f"--data {args.data} has no column {column!r} (its columns: {data.column_names}); "
                             f"name the right one with {flag}")
    return data


def _subsample(table, n: int | None, seed: int):
    """``n`` rows of ``table`` drawn with ``seed`` (in row order), or all of them when it has no more."""
    import numpy as np

    if n is None or n >= len(table):
        return table
    return table.select(sorted(np.random.default_rng(seed).permutation(len(table))[:n]))


STANDARD_COLUMNS = {"--image-column": "image", "--question-column": "question", "--answer-column": "answer"}
"""Each column flag -> the column name the toolkit reads by default."""


def _column_flags(args: argparse.Namespace) -> dict[str, str]:
    """Each column flag -> the column of ``--data`` it names."""
    return {"--image-column": args.image_column, "--question-column": args.question_column,
            "--answer-column": args.answer_column}


def _selection_data(args: argparse.Namespace):
    """The questions a choice is measured on (``plan``, ``compare``): ``--samples`` of shapes-vqa's ``--split``
    (seed ``--seed``), or with ``--data`` that many rows of your own data set (all of them when it has fewer),
    its columns renamed to image/question/answer and its path recorded as the data set's name."""
    from eemllm_models import load_shapes_vqa

    if args.data is None:
        return load_shapes_vqa(args.split, n=args.samples, seed=args.seed)
    flags = _column_flags(args)
    table = _subsample(_user_data(args, list(flags.items())), args.samples, args.seed)
    renamed = {column: STANDARD_COLUMNS[flag] for flag, column in flags.items() if column != STANDARD_COLUMNS[flag]}
    table = table.remove_columns([c for c in renamed.values() if c in table.column_names]).rename_columns(renamed)
    table.info.dataset_name = str(args.data.resolve())
    return table


def _plan(args: argparse.Namespace) -> int:
    import probes

    from analyses.choosing import policies
    from analyses.choosing.methods import describe

    if args.data is not None and args.k is not None:
        raise ValueError(f"--data is the data set a choice is measured on, and --policy {args.policy} --k {args.k} "
                         "measures none: drop --data, or choose with --tolerance (shortv) or --policy greedy/budget")
    if args.target is not None and args.policy not in ("budget", "greedy"):
        raise ValueError(f"--target is a FLOPs share for --policy budget or greedy; --policy {args.policy} freezes "
                         "--k layers (or the most --tolerance allows): drop --target")
    _note_selection_split(args)
    loaded = counted = selection = None
    if args.policy in policies.POLICIES:
        if (args.k is None) == (args.tolerance is None):
            raise ValueError(f"--policy {args.policy} needs either --k (layers to freeze) or --tolerance "
                             "(the largest k whose measured accuracy drop stays within it)")
        lc = probes.open_result(args.lc or _missing("--lc (lc.nc from `eemllm probe`)"), probe="layer_contribution")
        if args.k is not None:
            plan = policies.freeze_plan(lc, args.k, args.policy, args.seed)
        elif args.policy != "shortv":
            raise ValueError("--tolerance chooses k for the shortv policy only; give --k for cosine and random")
        else:
            loaded, selection = _load(args), _selection_data(args)
            plan = policies.shortv_within_tolerance(lc, _held_out_accuracy(loaded, selection), args.tolerance)
    elif args.policy in ("budget", "greedy"):
        modes = probes.open_result(args.modes or _missing("--modes (mode_contribution.nc from `eemllm probe`)"),
                                   probe="mode_contribution")
        loaded, selection = _load(args), _selection_data(args)
        model, _ = loaded
        counted = _selection_tokens(loaded, selection)
        tokens = counted[0]
        if args.policy == "budget":
            plan = policies.budget_plan(modes, model.config, tokens, 0.5 if args.target is None else args.target)
        else:
            plan = policies.greedy_plan(modes, model.config, tokens, _held_out_accuracy(loaded, selection),
                                        0.01 if args.tolerance is None else args.tolerance, target=args.target)
    else:
        raise ValueError(f"unknown policy {args.policy!r}; choose from {[*policies.POLICIES, 'budget', 'greedy']}")
    plan, flops_line = _plan_flops_provenance(args, plan, loaded, selection, counted)
    path = plan.save(args.out)
    print(f"{args.policy}: {describe(plan)}; wrote {path}")
    print(flops_line)
    print(_accuracy_line(plan))
    if plan.provenance.get("reached_target") is False:
        print(f"note: greedy kept every change within --tolerance {plan.provenance['tolerance']} and stopped at "
              f"{plan.provenance['flops_ratio']:.1%} of the FLOPs, above --target {args.target}; allow a larger "
              "--tolerance to go further")
    return 0


def _note_selection_split(args: argparse.Namespace) -> None:
    """Say so when a choice is made on the test split, where final scores are reported."""
    if getattr(args, "split", None) == "test":
        print("note: choosing on the test split, where `eemllm evaluate` reports final scores; a plan chosen on "
              "the questions it is scored on overstates its accuracy (use --split validation)", file=sys.stderr)


def _selection_tokens(loaded, data):
    """The mean prompt of the questions ``data`` choices are made on (:func:`_selection_data`), and its source."""
    from analyses.measuring.tokens import dataset_token_counts, describe_rows

    model, processor = loaded
    return dataset_token_counts(model, processor, data), describe_rows(data)


def _plan_flops_provenance(args: argparse.Namespace, plan, loaded, selection=None, counted=None):
    """``plan`` with its FLOPs recorded (ratio, convention, prompt) and the line ``eemllm plan`` prints:
    counted for the mean prompt of the ``selection`` questions when a model was loaded (``counted``, if
    already known), else for the prompt ``analyses.measuring.tokens.resolve_token_counts`` gives ``--model``."""
    from analyses.measuring.flops import flops_figures, flops_provenance, load_config
    from analyses.measuring.tokens import resolve_token_counts

    try:
        if loaded is not None:
            config = loaded[0].config
            tokens, source = counted or _selection_tokens(loaded, selection)
        else:
            config = load_config(args.model)
            tokens, source = resolve_token_counts(args.model, plan, config)
        figures = flops_figures(config, plan, tokens)
    except (ValueError, OSError) as err:
        return plan, f"FLOPs: not counted ({err}; pass the plan's model with --model)"
    plan = plan.with_provenance(**flops_provenance(config, plan, tokens, source))
    return plan, _flops_line(figures, source)


def _flops_line(figures, source: str) -> str:
    from analyses.measuring.flops import format_flops

    line = (f"decoder prefill FLOPs: {figures['decoder_flops_ratio']:.1%} of the original (shortv convention; "
            f"{format_flops(figures['decoder_flops_original'])} -> {format_flops(figures['decoder_flops_pruned'])} "
            f"for {figures['text_tokens']} text + {figures['visual_tokens']} visual tokens, {source})")
    if "prefill_flops_ratio" in figures:
        line += f"; whole prefill {figures['prefill_flops_ratio']:.1%} (full convention)"
    return line


def _accuracy_line(plan) -> str:
    provenance = plan.provenance
    if "accuracy" not in provenance:
        return ("held-out accuracy: not measured by this policy (choose with --tolerance or --policy greedy, or "
                "score the plan with `eemllm evaluate --plan`)")
    where = provenance.get("selection", {})
    return (f"held-out accuracy on {where.get('dataset', 'shapes-vqa')} {where.get('split', '?')} "
            f"(n={where.get('n', '?')}): {provenance['accuracy']:.1%} "
            f"(original {provenance['baseline_accuracy']:.1%}); score it on the test split with `eemllm evaluate`")


def _missing(what: str):
    raise ValueError(f"this policy needs {what}")


def _held_out_accuracy(loaded, data):
    """``plan -> accuracy`` on the selection questions ``data`` (:func:`_selection_data`; for shapes-vqa the
    validation split by default: held out from the probe's train prompts and from the test split that
    scores the plan)."""
    from analyses.choosing.compare import accuracy_on

    model, processor = loaded
    return accuracy_on(model, processor, data)


def _compare(args: argparse.Namespace) -> int:
    import probes
    from eemllm_models.files import atomic_write

    from analyses.choosing.compare import compare_policies, policy_table
    from analyses.choosing.heldout import describe
    from analyses.measuring.tokens import dataset_token_counts, describe_rows
    from analyses.reporting.claims import check_claims

    _note_selection_split(args)
    lc = probes.open_result(args.lc, probe="layer_contribution")
    model, processor = _load(args)
    data = _selection_data(args)
    tokens = dataset_token_counts(model, processor, data)
    frame = compare_policies(model, processor, data, lc, args.ks, tokens, args.policies, args.seeds, args.batch_size)
    path = atomic_write(args.out, lambda tmp: frame.to_csv(tmp, index=False))
    table = policy_table(frame)
    table["interval"] = [f"[{low:.1%}, {high:.1%}]" for low, high in zip(table.low, table.high)]
    print(table[["k", "policy", "seeds", "flops_ratio", "accuracy", "interval"]].to_string(
        index=False, formatters={"flops_ratio": "{:.3f}".format, "accuracy": "{:.1%}".format}))
    where = describe(data)
    methods = " or ".join(sorted(set(table.method)))
    print(f"accuracy on {where['dataset']} {where['split']} (n={len(data)}); random: the mean over seeds; 95% "
          f"intervals: {methods}; FLOPs: shortv convention for the {describe_rows(data)}, {tokens.text} text + "
          f"{tokens.visual} visual tokens")
    for claim in check_claims(frame).values():
        print(f"{claim['claim']}: {claim['verdict']}\n  {claim['statement']}")
    print(f"wrote {path}")
    return 0


def _flops(args: argparse.Namespace) -> int:
    from eemllm_models import EfficiencyPlan
    from eemllm_models.apply import CONFIG_KEY

    from analyses.measuring.flops import load_config, visual_tokens_per_image
    from analyses.measuring.tokens import resolve_token_counts

    config = load_config(args.model)
    n_layers = config.get_text_config().num_hidden_layers
    carried = getattr(config, CONFIG_KEY, None)
    if carried is not None and args.plan is None:  # a pruned model (eemllm prune) counts the plan it carries
        plan = EfficiencyPlan.from_dict(carried)
    else:
        plan = _plan_for(n_layers, args.plan)
    plan.check_layers(n_layers, f"--model {args.model}")
    visual = args.visual_tokens
    if visual is None and args.images != 1:
        visual = args.images * visual_tokens_per_image(config)
    try:
        tokens, source = resolve_token_counts(args.model, plan, config, args.text_tokens, visual)
    except ValueError as err:
        raise ValueError(f"{err}; give --text-tokens and --visual-tokens") from err
    (_shortv_flops if args.convention == "shortv" else _full_flops)(args, config, plan, EfficiencyPlan.empty(n_layers),
                                                                    tokens, source)
    return 0


def _shortv_flops(args: argparse.Namespace, config, plan, original_plan, tokens, source: str) -> None:
    from analyses.choosing.methods import describe
    from analyses.measuring.flops import format_flops, plan_flops

    original = float(plan_flops(config, original_plan, tokens).flops.sum())
    planned = float(plan_flops(config, plan, tokens).flops.sum())
    print(f"{args.model}, plan {args.plan or 'none'} ({describe(plan)}), ShortV convention (decoder prefill, "
          f"attention + MLP), {tokens.text} text + {tokens.visual} visual tokens ({source}):")
    print(f"  original {format_flops(original)}, planned {format_flops(planned)} "
          f"({planned / original:.1%} of the original), FLOPs-ideal speedup {original / planned:.2f}x")


def _full_flops(args: argparse.Namespace, config, plan, original_plan, tokens, source: str) -> None:
    import pandas as pd

    from analyses.choosing.methods import describe
    from analyses.measuring.flops import PARTS, flops_unit, full_flops

    try:
        parts = PARTS
        full_flops(config, original_plan, tokens)
    except NotImplementedError as err:
        if args.visual_tokens is None:
            raise ValueError(f"{err}; give --visual-tokens to count the language model alone") from err
        parts = ("decoder", "lm_head")
        print(f"note: {err}; counting the language model only")
    rows = {}
    for name, chosen in (("original", original_plan), ("planned", plan)):
        frame = full_flops(config, chosen, tokens, decode_tokens=1, parts=parts)
        rows[name] = frame.assign(where=frame.phase + " " + frame.part).groupby("where", sort=False).flops.sum()
    table = pd.DataFrame(rows)
    table.loc["prefill total"] = table.filter(like="prefill", axis=0).sum()
    scale, unit = flops_unit(table.loc["prefill total", "original"])
    ratio = table.loc["prefill total", "planned"] / table.loc["prefill total", "original"]
    table = table / scale
    table["planned / original"] = table.planned / table.original
    print(f"{args.model}, plan {args.plan or 'none'} ({describe(plan)}), {tokens.visual} visual + "
          f"{tokens.text} text tokens ({source}), full count ({unit}; decode: one token):")
    print(table.to_string(float_format=lambda v: f"{v:.4g}"))
    print(f"prefill total: {ratio:.1%} of the original (full convention)")


def _latency(args: argparse.Namespace) -> int:
    from eemllm_models import EfficiencyPlan
    from eemllm_models.files import atomic_write

    from analyses.evaluating.benchmarks import shapes_vqa_ranges
    from analyses.measuring.latency import measure_latency

    from eemllm_models.apply import applied_plan

    if args.plan is not None:
        EfficiencyPlan.resolve(args.plan)  # a bad --plan fails before the model loads
    model, processor = _load(args)
    carried = applied_plan(model)
    if carried is None and args.plan is None:
        raise ValueError("eemllm latency compares the original with a plan: pass --plan (a preset or a plan JSON "
                         "file), or --model a folder written by eemllm prune")
    plan = _plan_for(model, args.plan)
    if carried is not None:  # a pruned model: its own plan against the same weights without it
        plan = carried.plan
        carried.remove()
    rows = shapes_vqa_ranges(args.split, n=args.samples, seed=args.seed)  # generated one batch at a time
    frame = measure_latency(model, processor, rows.column("image"), rows.column("question"),
                            {"original": None, "planned": plan}, new_tokens=args.new_tokens, warmup=args.warmup,
                            repeats=args.repeats, batch_size=args.batch_size)
    path = atomic_write(args.out / "latency.csv", lambda tmp: frame.to_csv(tmp, index=False))
    print(frame[["variant", "prefill_ms", "prefill_ms_iqr", "decode_tokens_per_s", "prefill_speedup",
                 "prefill_speedup_low", "prefill_speedup_high", "decode_speedup", "noisy", "peak_memory_mb"]]
          .to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if frame.noisy.any():
        print("noisy: a speedup's 95% interval includes 1.0, or its repeats spread more than 10% of their median; "
              "rerun with more --repeats on an idle machine")
    print(f"{frame.device.iloc[0]}, {frame.dtype.iloc[0]}, batch {frame.batch.iloc[0]}, "
          f"{frame.repeats.iloc[0]} repeats; wrote {path}")
    return 0


DTYPES = ("float32", "bfloat16", "float16")


def _load(args: argparse.Namespace):
    """The model and processor named by ``--model`` on ``--device`` in ``--dtype``; a pruned model
    directory (``eemllm prune``) comes with its plan applied."""
    import torch

    from eemllm_models import load_checkpoint
    from eemllm_models.loading import looks_like_path
    from eemllm_models.zoo import zoo_name

    name = str(args.model)
    if zoo_name(name) is None and not Path(name).expanduser().exists() and looks_like_path(name):
        raise FileNotFoundError(f"no model folder at {name}; pass --model with the folder of a saved model "
                                "(save_pretrained, or `eemllm prune --out`), a hub id such as "
                                "llava-hf/llava-1.5-7b-hf, or --model default (zoo:default) for the embedded model")
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: no CUDA device is available here; use --device cpu")
        index = int(args.device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}; pick one of them")
    if args.device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: no Apple GPU (MPS) is available here; use --device cpu")
    device_map = "auto" if args.device == "auto" else None
    model, processor = load_checkpoint(name, getattr(torch, args.dtype), device_map)
    return (model, processor) if device_map else (model.to(args.device), processor)


def _plan_for(model, plan: str | None):
    """The plan named on the command line for ``model`` (a loaded model or a layer count): a preset,
    a JSON file, or none (all layers full)."""
    from eemllm_models import EfficiencyPlan
    from eemllm_models.apply import applied_plan

    if not isinstance(model, int) and applied_plan(model) is not None and plan is not None:
        raise ValueError("--model is a pruned model that runs its own plan; drop --plan, or pass the original model")
    if plan is None:
        return EfficiencyPlan.uniform(model, "full")
    return EfficiencyPlan.resolve(plan)


def _evaluate(args: argparse.Namespace) -> int:
    from eemllm_models import EfficiencyPlan
    from eemllm_models.apply import applied_plan
    from eemllm_models.files import atomic_write, atomic_write_json

    from analyses.evaluating.benchmarks import RowRanges, benchmark_ranges
    from analyses.evaluating.evaluate import answer_frame, scores

    benchmark = args.benchmark or ("shapes-vqa" if args.data is None else None)
    if benchmark == "shapes-vqa" and args.data is not None:
        raise ValueError("shapes-vqa is generated, not read from files: drop --data, or drop --benchmark to "
                         "evaluate your own data set at --data")
    if args.plan is not None:
        EfficiencyPlan.resolve(args.plan)  # a bad --plan fails before the data and the model load
    flags = _column_flags(args)
    columns = {f"{STANDARD_COLUMNS[flag]}_column": column for flag, column in flags.items()}
    if benchmark is None:
        table = _user_data(args, list(flags.items()))
        data = RowRanges.of(_subsample(table, args.samples, args.seed))
    else:
        if any(column != STANDARD_COLUMNS[flag] for flag, column in flags.items()):
            raise ValueError(f"--benchmark {benchmark} has its own columns; --image-column, --question-column and "
                             "--answer-column are for your own data set (--data without --benchmark)")
        samples = 140 if args.samples is None and benchmark == "shapes-vqa" else args.samples
        data = benchmark_ranges(benchmark, path=args.data, split=args.split, n=samples, seed=args.seed)
    model, processor = _load(args)
    carried = applied_plan(model)
    plan = carried.plan if carried and args.plan is None else _plan_for(model, args.plan)
    from analyses.choosing.heldout import check_plan_held_out, split_name

    if benchmark is not None:
        from analyses.evaluating.benchmarks import BENCHMARKS

        check_plan_held_out(plan, benchmark, args.split or BENCHMARKS[benchmark].split, args.allow_overlap,
                            "pass --allow-overlap")
    else:
        check_plan_held_out(plan, str(args.data.resolve()), split_name(table), args.allow_overlap,
                            "pass --allow-overlap")
    frame = answer_frame(model, processor, data, plan=None if carried else plan, batch_size=args.batch_size,
                         max_new_tokens=args.max_new_tokens, **columns)
    result = scores(frame)
    atomic_write(args.out / "answers.csv", lambda tmp: frame.to_csv(tmp, index=False))
    atomic_write_json(args.out / "scores.json", {"plan": plan.to_dict(), "scores": result})
    _print_scores(frame, result)
    print(f"wrote {args.out / 'answers.csv'} and {args.out / 'scores.json'}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    from eemllm_models import EfficiencyPlan, save_pruned
    from eemllm_models.files import ForeignFolderError, replaceable

    if args.out.exists():
        if not args.overwrite:
            raise FileExistsError(f"{args.out} already exists; choose another --out or pass --overwrite to replace it")
        if not replaceable(args.out):
            raise ForeignFolderError(args.out)
    EfficiencyPlan.resolve(args.plan)  # a bad --plan fails before the model loads
    model, processor = _load(args)
    plan = _plan_for(model, args.plan)
    path = save_pruned(model, plan, args.out, processor=processor, overwrite=args.overwrite)
    print(f"wrote {path} ({len(plan.modes) - len(plan.layers('full'))} of {plan.n_layers} layers changed); "
          "load it with eemllm_models.load_pruned")
    return 0


def _report(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from analyses.reporting.report import load_report_inputs, write_report

    _check_table(args.latency, "--latency", "latency.csv", "eemllm latency --out DIR", ("variant", "prefill_ms"))
    _check_table(args.comparison, "--comparison", "the CSV file", "eemllm compare --out FILE.csv",
                 ("k", "policy", "accuracy"))
    inputs = load_report_inputs(args.probes, plan=args.plan, comparison=args.comparison, latency=args.latency,
                                answers=args.answers, pruned_model=args.pruned_model)
    if args.scores:
        original, pruned = (json.loads(Path(p).read_text())["scores"] for p in args.scores)
        inputs = dataclasses.replace(inputs, scores={"original": original, "pruned": pruned})
    if inputs.flops is None or args.model is not None:
        flops = _report_flops(args.model or inputs.lc.attrs.get("model"), inputs.plan)
        if flops is not None:
            inputs = dataclasses.replace(inputs, flops=flops)
    path = write_report(inputs, args.out, overwrite=args.overwrite)
    print(f"wrote {path} (and report.md, figures/, summary.json beside it)")
    return 0


def _check_table(path: Path | None, flag: str, name: str, command: str, columns: tuple[str, ...]) -> None:
    """Refuse a ``flag`` file that is not the CSV table ``command`` writes (with ``columns``), naming it."""
    import pandas as pd

    if path is None:
        return
    fix = f"pass {name} that `{command}` writes"
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file; {fix}")
    try:
        found = set(pd.read_csv(path, nrows=0).columns) if path.suffix.lower() == ".csv" else set()
    except (ValueError, UnicodeDecodeError):  # pandas' ParserError and EmptyDataError are ValueErrors
        found = set()
    if not set(columns) <= found:
        raise ValueError(f"{flag} {path} is not the table `{command.split(' --')[0]}` writes (a .csv file with "
                         f"columns {', '.join(columns)}, ...); {fix}")


def _report_flops(model: str | None, plan):
    """The report's FLOPs figures for ``plan`` on ``model`` (the probes' model unless ``--model``), with the
    token counts of ``analyses.measuring.tokens``; None (and a note saying why) when they cannot be counted."""
    from analyses.measuring.flops import flops_figures, load_config
    from analyses.measuring.tokens import resolve_token_counts

    if not model:
        print("note: FLOPs not counted: the probe result names no model; pass --model", file=sys.stderr)
        return None
    try:
        config = load_config(model)
        tokens, _ = resolve_token_counts(model, plan, config)
        return flops_figures(config, plan, tokens)
    except (ValueError, OSError) as err:
        print(f"note: FLOPs not counted ({err}); pass --model with the plan's model", file=sys.stderr)
        return None


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


class _Checked(argparse.Action):
    """Store an option's value (or each of its values) after ``check(value)``; a problem it returns is
    reported by argparse as ``FLAG PROBLEM`` (e.g. ``--samples must be at least 1, got 0``), exit code 2."""

    def __init__(self, option_strings, dest, check: Callable[[object], str | None], **kwargs) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.check = check

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        for value in values if isinstance(values, list) else [values]:
            problem = self.check(value)
            if problem:
                parser.error(f"{option_string} {problem}")
        setattr(namespace, self.dest, values)


def _at_least(minimum: int) -> Callable[[int], str | None]:
    """A :class:`_Checked` check: the value must be at least ``minimum``."""
    return lambda value: None if value >= minimum else f"must be at least {minimum}, got {value}"


DEVICES = "cpu, cuda, cuda:N (N a GPU index), mps, or auto (accelerate spreads the model over the devices)"


def _device_problem(device: str) -> str | None:
    if device in ("cpu", "cuda", "mps", "auto") or re.fullmatch(r"cuda:\d+", device):
        return None
    return f"{device!r} is not a device eemllm runs on; choose {DEVICES}"


def _int_option(parser: argparse.ArgumentParser, flag: str, minimum: int, **kwargs) -> None:
    """Add an integer option ``flag`` whose values must be at least ``minimum``."""
    parser.add_argument(flag, type=int, action=_Checked, check=_at_least(minimum), **kwargs)


def _data_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """``--data`` and the column flags: the user's own data set instead of shapes-vqa."""
    parser.add_argument("--image-column", default="image", help="--data: the column of the images (default image)")
    parser.add_argument("--question-column", default="question",
                        help="--data: the column of the questions (default question)")
    parser.add_argument("--answer-column", default="answer", help=f"--data: the column of the answers (default "
                                                                  f"answer; {what})")


def _selection_data_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """``--data`` and its column flags for a command that chooses on held-out questions."""
    parser.add_argument("--data", type=Path, default=None,
                        help=f"your own held-out questions instead of shapes-vqa's (--samples of them, all if fewer) "
                             f"on which {what} are measured: a datasets save_to_disk folder (--split names one of "
                             "several), a parquet or a jsonl file; score the plan on other rows")
    _data_arguments(parser, "the reference answers")


def build_parser() -> argparse.ArgumentParser:
    """The ``eemllm`` argument parser with one sub-command per job."""
    parser = argparse.ArgumentParser(prog="eemllm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    loading = argparse.ArgumentParser(add_help=False)
    loading.add_argument("--model", default="default",
                         help="model directory (a pruned one comes with its plan), hub name, or zoo:NAME (default: zoo:default, "
                              "the embedded one)")
    loading.add_argument("--device", default="cpu", action=_Checked, check=_device_problem,
                         help="cpu (default), cuda, cuda:N, mps, or auto (accelerate device_map)")
    loading.add_argument("--dtype", default="float32", choices=DTYPES, help="weights dtype (default float32)")
    demo = commands.add_parser("demo", help="run the main job on the embedded default model")
    demo.add_argument("--out", type=Path, required=True, help="directory for the demo's results")
    demo.add_argument("--model", default="zoo:default", help="the zoo model to run it on (default: zoo:default, the "
                                                             "embedded one)")
    _int_option(demo, "--n", 1, default=28, help="number of shapes-vqa test questions (default 28)")
    _int_option(demo, "--seed", 0, default=0, help="seed of the test split (default 0)")
    _int_option(demo, "--probe-samples", 1, default=None,
                      help="train-split prompts for the probes (default 96 for zoo:default: fewer change the chosen "
                           "layers, see BENCHMARKS.md; 8 for zoo:smollm2-shapes, whose probes cost about 60 times "
                           "as much per sample)")
    _int_option(demo, "--compare-samples", 1, default=None,
                      help="validation questions on which the policies are compared (default 42 for zoo:default, 14 "
                           "for zoo:smollm2-shapes; the demo scores on test)")
    demo.add_argument("--overwrite", action="store_true", help="replace a pruned model and report left in --out")
    demo.set_defaults(run=_demo)

    probe = commands.add_parser("probe", parents=[loading],
                                help="measure Layer Contribution, mode contributions and attention statistics on "
                                     "shapes-vqa or your own --data (shard with torchrun/accelerate launch)")
    _int_option(probe, "--samples", 1, default=40, help="number of samples (default 40, as ShortV)")
    _int_option(probe, "--seed", 0, default=0, help="seed of the sample selection (default 0)")
    probe.add_argument("--out", type=Path, required=True, help="directory for lc.nc and the other probes' files")
    probe.add_argument("--probes", nargs="+", default=list(PROBE_FILES), metavar="PROBE",
                       help=f"which probes to run (default: all of {', '.join(PROBE_FILES)})")
    probe.add_argument("--split", default="train",
                       help="shapes-vqa split to draw samples from (default train); with --data, the split of a "
                            "save_to_disk folder that holds several")
    _int_option(probe, "--rows", 1, default=1400, help="rows of that shapes-vqa split to draw from (default 1400)")
    probe.add_argument("--data", type=Path, default=None,
                       help="your own data set instead of shapes-vqa: a datasets save_to_disk folder, a parquet file "
                            "or a jsonl file, one image and question per row")
    _data_arguments(probe, "read with --positions answer")
    _int_option(probe, "--batch-size", 1, default=8)
    probe.add_argument("--divergence", default="kl", help="kl (ShortV's, default), kl_reverse or js")
    probe.add_argument("--positions", default="last_prompt", help="last_prompt (default) or answer")
    probe.add_argument("--checkpoint", type=Path, default=None,
                       help="directory for per-batch checkpoints; rerun with it to resume an interrupted run")
    probe.set_defaults(run=_probe)

    plan = commands.add_parser("plan", parents=[loading],
                                help="turn probe results into an efficiency plan (shortv, cosine, random, budget, greedy)")
    plan.add_argument("--policy", default="shortv",
                      help="shortv (lowest visual LC, default), cosine, random: freeze k layers (--lc, --k or "
                           "--tolerance); budget: reach --target FLOPs (--modes); greedy: accuracy-checked (--modes)")
    plan.add_argument("--lc", type=Path, default=None, help="lc.nc written by `eemllm probe`")
    plan.add_argument("--modes", type=Path, default=None, help="mode_contribution.nc written by `eemllm probe`")
    _int_option(plan, "--k", 0, default=None, help="number of layers whose visual tokens are frozen")
    plan.add_argument("--target", type=float, default=None,
                      help="decoder FLOPs share to reach: budget (default 0.5) stops there; greedy stops trying once "
                           "it is reached (default: tries every change)")
    plan.add_argument("--tolerance", type=float, default=None,
                      help="largest accuracy drop allowed, measured on held-out questions (shortv: chooses k; "
                           "greedy: default 0.01)")
    _int_option(plan, "--samples", 1, default=70,
                      help="shapes-vqa questions the choice is measured on (default 70)")
    plan.add_argument("--split", default="validation",
                      help="shapes-vqa split the choice is measured on (default validation: held out from the "
                           "probes' train prompts and from the test split on which `eemllm evaluate` scores the plan)")
    _int_option(plan, "--seed", 0, default=0, help="seed of the random policy and the held-out questions")
    _selection_data_arguments(plan, "--tolerance or --policy greedy")
    plan.add_argument("--out", type=Path, required=True, help="plan JSON file to write")
    plan.set_defaults(run=_plan)

    compare = commands.add_parser("compare", parents=[loading],
                                  help="accuracy vs FLOPs of the freezing policies and the frozen-text control")
    compare.add_argument("--lc", type=Path, required=True, help="lc.nc written by `eemllm probe`")
    _int_option(compare, "--ks", 0, nargs="+", default=[3, 6, 9], help="numbers of layers to freeze")
    compare.add_argument("--policies", nargs="+", default=["shortv", "cosine", "random", "text"],
                         help="policies to compare (default: shortv cosine random text)")
    _int_option(compare, "--seeds", 0, nargs="+", default=[0, 1, 2], help="seeds of the random policy")
    _int_option(compare, "--samples", 1, default=70, help="shapes-vqa questions to compare on (default 70)")
    compare.add_argument("--split", default="validation",
                         help="shapes-vqa split to compare on (default validation: comparing chooses a policy and k, "
                              "so it runs on questions the test split, which scores the final plan, does not hold)")
    _int_option(compare, "--seed", 0, default=0, help="seed of the held-out questions")
    _selection_data_arguments(compare, "the policies")
    _int_option(compare, "--batch-size", 1, default=16)
    compare.add_argument("--out", type=Path, required=True, help="CSV file to write")
    compare.set_defaults(run=_compare)

    flops = commands.add_parser("flops", help="prefill FLOPs of a model under a plan (offline for the paper models)")
    flops.add_argument("--model", required=True,
                       help="llava-1.5-7b, llava-1.5-13b, llava-next-7b, llava-next-13b, default (zoo:default), or a "
                            "config path / hub id")
    flops.add_argument("--plan", default=None,
                       help="a preset (shortv:llava-1.5-7b, ...) or a plan JSON file (default: the plan a pruned "
                            "--model carries, else none)")
    flops.add_argument("--convention", default="shortv", choices=("shortv", "full"),
                       help="shortv: the paper's attention + MLP count (default); full: every part of a generate() "
                            "call, prefill and per decoded token")
    _int_option(flops, "--text-tokens", 1, default=None,
                       help="text tokens per prompt (default: the prompt the plan recorded; 64 for the paper models, "
                            "as ShortV; else the mean shapes-vqa test prompt through the model's processor)")
    _int_option(flops, "--visual-tokens", 0, default=None,
                       help="visual tokens per prompt (default: the plan's recorded prompt; the paper's 576 or 2880; "
                            "else the model's own count for a shapes-vqa image)")
    _int_option(flops, "--images", 1, default=1, help="full convention: images per prompt (default 1)")
    flops.set_defaults(run=_flops)

    latency = commands.add_parser("latency", parents=[loading],
                                  help="measure prefill time and decode tokens/s of the original and the planned model")
    latency.add_argument("--plan", default=None,
                         help="a preset or a plan JSON file (not with a pruned --model, which brings its own)")
    _int_option(latency, "--samples", 1, default=8,
            help="shapes-vqa prompts each run prefills and decodes, generated one batch at a time (default 8)")
    _int_option(latency, "--batch-size", 1, default=8, help="prompts per forward (default 8)")
    _int_option(latency, "--new-tokens", 2, default=16, help="greedy tokens decoded per prompt (default 16)")
    _int_option(latency, "--warmup", 0, default=2, help="untimed rounds first (default 2)")
    _int_option(latency, "--repeats", 1, default=5, help="timed rounds (default 5)")
    latency.add_argument("--split", default="test", help="shapes-vqa split (default test)")
    _int_option(latency, "--seed", 0, default=0, help="seed of the prompts (default 0)")
    latency.add_argument("--out", type=Path, required=True, help="directory for latency.csv")
    latency.set_defaults(run=_latency)

    evaluate = commands.add_parser("evaluate", parents=[loading],
                                   help="answer a benchmark's questions (under a plan) and score them")
    evaluate.add_argument("--plan", default=None, help="a preset or a plan JSON file (default: no plan)")
    evaluate.add_argument("--benchmark", default=None,
                          help="shapes-vqa (built in; the default without --data), mmbench, mme, pope, textvqa, gqa, "
                               "scienceqa-img or seedbench (from --data or the HF cache)")
    evaluate.add_argument("--allow-overlap", action="store_true",
                          help="score a plan on the split it was chosen on (warns instead of refusing)")
    evaluate.add_argument("--data", type=Path, default=None,
                          help="with --benchmark: its local copy (the downloaded hub folder or one data file); "
                               "without: your own data set (a datasets save_to_disk folder, a parquet file or a jsonl "
                               "file), scored by exact match")
    _data_arguments(evaluate, "compared with the prediction")
    _int_option(evaluate, "--samples", 1, default=None,
            help="number of questions (default: 140 of shapes-vqa, all of a public set or of --data)")
    _int_option(evaluate, "--seed", 0, default=0, help="seed of the question sample (default 0)")
    evaluate.add_argument("--split", default=None, help="split (default: the benchmark's own, test for shapes-vqa)")
    _int_option(evaluate, "--max-new-tokens", 1, default=None,
            help="answer length limit (default: 8 for shapes-vqa, 16 for public sets)")
    _int_option(evaluate, "--batch-size", 1, default=16)
    evaluate.add_argument("--out", type=Path, required=True, help="directory for answers.csv and scores.json")
    evaluate.set_defaults(run=_evaluate)

    report = commands.add_parser("report", help="write the redundancy report folder (HTML, Markdown, PNG, data)")
    report.add_argument("--probes", type=Path, required=True,
                        help="folder with lc.nc (and attention.nc, mode_contribution.nc) from `eemllm probe`, or a "
                             "demo folder")
    report.add_argument("--plan", type=Path, default=None, help="plan JSON (default: PROBES/plan.json)")
    report.add_argument("--comparison", type=Path, default=None, help="CSV from `eemllm compare`")
    report.add_argument("--latency", type=Path, default=None, help="latency.csv from `eemllm latency`")
    report.add_argument("--scores", type=Path, nargs=2, default=None, metavar=("ORIGINAL", "PRUNED"),
                        help="scores.json of `eemllm evaluate` without and with the plan")
    report.add_argument("--answers", type=Path, default=None, help="answers.csv of `eemllm evaluate`")
    report.add_argument("--pruned-model", type=Path, default=None, help="folder written by `eemllm prune`")
    report.add_argument("--model", default=None,
                        help="model (default, a shipped paper config, a folder) whose config counts the FLOPs "
                             "headline (default: the probes' model)")
    report.add_argument("--out", type=Path, required=True, help="report folder to write (refused if it exists)")
    report.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    report.set_defaults(run=_report)

    prune = commands.add_parser("prune", parents=[loading],
                                help="save a model with a plan as a training-free pruned model")
    prune.add_argument("--plan", required=True, help="a preset or a plan JSON file")
    prune.add_argument("--out", type=Path, required=True, help="directory to write (refused if it exists)")
    prune.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    prune.set_defaults(run=_prune)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``eemllm`` console script.

    The toolkit's errors about its input (``ValueError``, missing or existing files, a model that
    will not load) print one line, ``eemllm COMMAND: error: MESSAGE``, and return 2, as argparse
    does for bad arguments; Ctrl-C prints one line and returns 130; anything else is a bug and
    keeps its traceback.
    """
    from eemllm_models.files import ForeignFolderError
    from eemllm_models.loading import ModelLoadError

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, or a bad argument argparse already reported
        return exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 2
    try:
        return args.run(args)
    except ForeignFolderError as err:
        print(f"eemllm {args.command}: error: {err.path} was not written by eemllm, so --overwrite does not replace "
              "it (nothing in it was changed); choose another --out", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
            ModelLoadError) as err:
        print(f"eemllm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _close_progress_bars()
        resumable = getattr(args, "checkpoint", None) is not None
        print(f"eemllm {args.command}: interrupted" + ("; rerun with the same --checkpoint to resume" if resumable
                                                      else ""), file=sys.stderr)
        return 130


def _close_progress_bars() -> None:
    """End the progress bars an interrupted command left open, so that its last line is the command's own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
