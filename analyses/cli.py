"""``eemllm``: the command-line face of the toolkit (a thin layer over the library functions)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from eemllm_models.zoo import shapes_vqa


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(args.out, n=args.n, seed=args.seed, probe_samples=args.probe_samples,
                      compare_samples=args.compare_samples, overwrite=args.overwrite)
    frame = result.answers
    print(frame[["qtype", "question", "answer", "prediction", "pruned_prediction"]]
          .assign(question=frame.question.str.split("\n").str[0]).to_string(index=False))
    print()
    _print_lc(result.lc)
    print()
    frozen = sorted(result.plan.layers("frozen"))
    print(f"ShortV plan: freeze visual tokens in layers {frozen}; decoder FLOPs {result.flops_ratio:.0%} of the original")
    print(f"{'':>9}  original  pruned  chance")
    for qtype, group in frame.groupby("qtype"):
        print(f"{qtype:>9}: {group.correct.mean():7.1%} {group.pruned_correct.mean():7.1%}  "
              f"{shapes_vqa.CHANCE[qtype]:5.0%}  (n={len(group)})")
    print(f"  overall: {frame.correct.mean():7.1%} {frame.pruned_correct.mean():7.1%}  (n={len(frame)})")
    print()
    table = result.comparison.groupby(["k", "policy"], sort=False).agg(
        flops=("flops_ratio", "mean"), accuracy=("accuracy", "mean")).unstack("policy")["accuracy"]
    print("accuracy by number of frozen layers (random: mean of 3 seeds; text: text tokens frozen instead):")
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    latency = result.latency.set_index("variant")
    print(f"prefill {latency.prefill_ms['original']:.0f} ms -> {latency.prefill_ms['pruned']:.0f} ms "
          f"({latency.prefill_speedup['pruned']:.2f}x, median of {latency.repeats['pruned']} paired runs)")
    print(f"wrote {args.out}: report/index.html, pruned-model/, plan.json, the probes' .nc files, "
          "comparison.csv, latency.csv, demo_answers.csv, demo_summary.json")
    return 0


def _print_lc(lc) -> None:
    """The mean Layer Contribution per layer and group, and how often visual is below text."""
    table = lc.lc.mean("sample").to_pandas()
    print(f"Layer Contribution ({lc.attrs['divergence']}, nats, mean over {lc.sizes['sample']} samples):")
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    below = int((table.visual < table.text).sum())
    print(f"visual LC below text LC in {below} of {len(table)} layers")


PROBE_FILES = {"lc": "lc.nc", "modes": "mode_contribution.nc", "attention": "attention.nc"}


def _probe(args: argparse.Namespace) -> int:
    import probes
    from eemllm_models import load_shapes_vqa

    unknown = sorted(set(args.probes) - set(PROBE_FILES))
    if unknown:
        raise ValueError(f"unknown probe(s) {unknown}; choose from {sorted(PROBE_FILES)}")
    model, processor = _load(args)
    data = load_shapes_vqa(args.split, n=args.rows)
    common = dict(samples=args.samples, seed=args.seed, batch_size=args.batch_size)
    for name in args.probes:
        checkpoint = None if args.checkpoint is None else args.checkpoint / name
        if name == "lc":
            result = probes.layer_contribution(model, processor, data, divergence=args.divergence,
                                               positions=args.positions, checkpoint=checkpoint, **common)
        elif name == "modes":
            result = probes.mode_contribution(model, processor, data, divergence=args.divergence,
                                              positions=args.positions, checkpoint=checkpoint, **common)
        else:
            result = probes.attention_statistics(model, processor, data, checkpoint=checkpoint, **common)
        if _is_main_process():
            path = probes.save_result(result, args.out / PROBE_FILES[name])
            print(f"wrote {path}")
            if name == "lc":
                _print_lc(result)
    return 0


def _plan(args: argparse.Namespace) -> int:
    import probes

    from . import policies

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
            plan = policies.shortv_within_tolerance(lc, _held_out_accuracy(args), args.tolerance)
    elif args.policy in ("budget", "greedy"):
        from .tokens import shapes_vqa_token_counts

        modes = probes.open_result(args.modes or _missing("--modes (mode_contribution.nc from `eemllm probe`)"),
                                   probe="mode_contribution")
        model, processor = _load(args)
        tokens = shapes_vqa_token_counts(model, processor)
        if args.policy == "budget":
            plan = policies.budget_plan(modes, model.config, tokens, args.target)
        else:
            plan = policies.greedy_plan(modes, model.config, tokens, _held_out_accuracy(args, (model, processor)),
                                        0.01 if args.tolerance is None else args.tolerance)
    else:
        raise ValueError(f"unknown policy {args.policy!r}; choose from {[*policies.POLICIES, 'budget', 'greedy']}")
    path = plan.save(args.out)
    changed = {m: list(plan.layers(m)) for m in ("frozen", "naavit", "composite") if plan.layers(m)}
    print(f"{args.policy}: {changed or 'no layer changed'}; wrote {path}")
    return 0


def _missing(what: str):
    raise ValueError(f"this policy needs {what}")


def _held_out_accuracy(args: argparse.Namespace, loaded=None):
    """``plan -> accuracy`` on ``--samples`` shapes-vqa questions of ``--split`` (held out from the probe's)."""
    from eemllm_models import load_shapes_vqa

    from .compare import accuracy_on

    model, processor = loaded or _load(args)
    return accuracy_on(model, processor, load_shapes_vqa(args.split, n=args.samples, seed=args.seed))


def _compare(args: argparse.Namespace) -> int:
    import probes
    from eemllm_models import load_shapes_vqa
    from eemllm_models.files import atomic_write

    from .compare import compare_policies
    from .tokens import shapes_vqa_token_counts

    lc = probes.open_result(args.lc, probe="layer_contribution")
    model, processor = _load(args)
    frame = compare_policies(model, processor, load_shapes_vqa(args.split, n=args.samples, seed=args.seed), lc,
                             args.ks, shapes_vqa_token_counts(model, processor), args.policies, args.seeds,
                             args.batch_size)
    path = atomic_write(args.out, lambda tmp: frame.to_csv(tmp, index=False))
    table = frame.groupby(["k", "policy"], sort=False).agg(flops=("flops_ratio", "mean"), accuracy=("accuracy", "mean"))
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {path}")
    return 0


def _flops(args: argparse.Namespace) -> int:
    from eemllm_models import EfficiencyPlan

    from .flops import load_config

    config = load_config(args.model)
    n_layers = config.get_text_config().num_hidden_layers
    plan = _plan_for(n_layers, args.plan)
    (_shortv_flops if args.convention == "shortv" else _full_flops)(args, config, plan, EfficiencyPlan.empty(n_layers))
    return 0


def _shortv_flops(args: argparse.Namespace, config, plan, original_plan) -> None:
    from .flops import shortv_convention_flops

    original = shortv_convention_flops(config, original_plan, args.text_tokens, args.visual_tokens)
    planned = shortv_convention_flops(config, plan, args.text_tokens, args.visual_tokens)
    print(f"{args.model}, plan {args.plan or 'none'} ({len(plan.layers('frozen'))} frozen layers), "
          "ShortV convention (attention + MLP):")
    print(f"  original {original / 1e12:.1f} TFLOPs, planned {planned / 1e12:.1f} TFLOPs "
          f"({planned / original:.0%}), FLOPs-ideal speedup {original / planned:.2f}x")


def _full_flops(args: argparse.Namespace, config, plan, original_plan) -> None:
    import pandas as pd

    from .flops import PARTS, TokenCounts, full_flops, visual_tokens_per_image

    try:
        visual = args.visual_tokens or args.images * visual_tokens_per_image(config)
        parts = PARTS
        full_flops(config, original_plan, TokenCounts(0, visual, args.text_tokens))
    except NotImplementedError as err:
        if args.visual_tokens is None:
            raise ValueError(f"{err}; give --visual-tokens to count the language model alone") from err
        parts = ("decoder", "lm_head")
        print(f"note: {err}; counting the language model only")
    tokens = TokenCounts(0, visual, args.text_tokens)
    rows = {}
    for name, chosen in (("original", original_plan), ("planned", plan)):
        frame = full_flops(config, chosen, tokens, decode_tokens=1, parts=parts)
        rows[name] = frame.assign(where=frame.phase + " " + frame.part).groupby("where", sort=False).flops.sum()
    table = pd.DataFrame(rows) / 1e12
    table.loc["prefill total"] = table.filter(like="prefill", axis=0).sum()
    table["planned / original"] = table.planned / table.original
    print(f"{args.model}, plan {args.plan or 'none'}, {visual} visual + {args.text_tokens} text tokens, "
          "full count (TFLOPs; decode: one token):")
    print(table.to_string(float_format=lambda v: f"{v:.4g}"))


def _latency(args: argparse.Namespace) -> int:
    from eemllm_models import load_shapes_vqa
    from eemllm_models.files import atomic_write

    from .latency import measure_latency

    model, processor = _load(args)
    plan = _plan_for(model, args.plan)
    data = load_shapes_vqa(args.split, n=args.samples, seed=args.seed)
    frame = measure_latency(model, processor, data["image"], data["question"], {"original": None, "planned": plan},
                            new_tokens=args.new_tokens, warmup=args.warmup, repeats=args.repeats,
                            batch_size=args.batch_size)
    path = atomic_write(args.out / "latency.csv", lambda tmp: frame.to_csv(tmp, index=False))
    print(frame[["variant", "prefill_ms", "prefill_ms_iqr", "decode_tokens_per_s", "prefill_speedup",
                 "decode_speedup", "peak_memory_mb"]].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"{frame.device.iloc[0]}, {frame.dtype.iloc[0]}, batch {frame.batch.iloc[0]}, "
          f"{frame.repeats.iloc[0]} repeats; wrote {path}")
    return 0


DTYPES = ("float32", "bfloat16", "float16")


def _load(args: argparse.Namespace):
    """The model and processor named by ``--model`` on ``--device`` in ``--dtype``; a pruned model
    directory (``eemllm prune``) comes with its plan applied."""
    import torch

    from eemllm_models import load_checkpoint

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is available here; use --device cpu")
    device_map = "auto" if args.device == "auto" else None
    model, processor = load_checkpoint(args.model, getattr(torch, args.dtype), device_map)
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
    import json

    from eemllm_models.apply import applied_plan
    from eemllm_models.files import atomic_write, atomic_write_text

    from .benchmarks import load_benchmark
    from .evaluate import answer_frame, scores

    samples = 140 if args.samples is None and args.benchmark == "shapes-vqa" else args.samples
    data = load_benchmark(args.benchmark, path=args.data, split=args.split, n=samples, seed=args.seed)
    model, processor = _load(args)
    carried = applied_plan(model)
    plan = carried.plan if carried and args.plan is None else _plan_for(model, args.plan)
    frame = answer_frame(model, processor, data, plan=None if carried else plan, batch_size=args.batch_size,
                         max_new_tokens=args.max_new_tokens)
    result = scores(frame)
    atomic_write(args.out / "answers.csv", lambda tmp: frame.to_csv(tmp, index=False))
    atomic_write_text(args.out / "scores.json", json.dumps({"plan": plan.to_dict(), "scores": result}, indent=1) + "\n")
    for name, value in result.items():
        print(f"{name:>17}: {value:.3f}")
    print(f"wrote {args.out / 'answers.csv'} and {args.out / 'scores.json'}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    from eemllm_models import save_pruned

    model, processor = _load(args)
    plan = _plan_for(model, args.plan)
    path = save_pruned(model, plan, args.out, processor=processor, overwrite=args.overwrite)
    print(f"wrote {path} ({len(plan.modes) - len(plan.layers('full'))} of {plan.n_layers} layers changed); "
          "load it with eemllm_models.load_pruned")
    return 0


def _report(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from .report import load_report_inputs, write_report

    inputs = load_report_inputs(args.probes, plan=args.plan, comparison=args.comparison, latency=args.latency,
                                answers=args.answers, pruned_model=args.pruned_model)
    if args.scores:
        original, pruned = (json.loads(Path(p).read_text())["scores"] for p in args.scores)
        inputs = dataclasses.replace(inputs, scores={"original": original, "pruned": pruned})
    path = write_report(inputs, args.out, overwrite=args.overwrite)
    print(f"wrote {path} (and report.md, figures/, summary.json beside it)")
    return 0


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def build_parser() -> argparse.ArgumentParser:
    """The ``eemllm`` argument parser with one sub-command per job."""
    parser = argparse.ArgumentParser(prog="eemllm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    loading = argparse.ArgumentParser(add_help=False)
    loading.add_argument("--model", default="default",
                         help="model directory (a pruned one comes with its plan) or hub name (default: the embedded one)")
    loading.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, or auto (accelerate device_map)")
    loading.add_argument("--dtype", default="float32", choices=DTYPES, help="weights dtype (default float32)")
    demo = commands.add_parser("demo", help="run the main job on the embedded default model")
    demo.add_argument("--out", type=Path, required=True, help="directory for the demo's results")
    demo.add_argument("--n", type=int, default=28, help="number of shapes-vqa test questions (default 28)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the test split (default 0)")
    demo.add_argument("--probe-samples", type=int, default=96,
                      help="train-split prompts for the probes (default 96: fewer change the chosen layers, "
                           "see BENCHMARKS.md)")
    demo.add_argument("--compare-samples", type=int, default=42,
                      help="test questions on which the policies are compared (default 42)")
    demo.add_argument("--overwrite", action="store_true", help="replace a pruned model and report left in --out")
    demo.set_defaults(run=_demo)

    probe = commands.add_parser("probe", parents=[loading],
                                help="measure Layer Contribution, mode contributions and attention statistics on "
                                     "shapes-vqa (shard with torchrun/accelerate launch)")
    probe.add_argument("--samples", type=int, default=40, help="number of samples (default 40, as ShortV)")
    probe.add_argument("--seed", type=int, default=0, help="seed of the sample selection (default 0)")
    probe.add_argument("--out", type=Path, required=True, help="directory for lc.nc and the other probes' files")
    probe.add_argument("--probes", nargs="+", default=list(PROBE_FILES), metavar="PROBE",
                       help=f"which probes to run (default: all of {', '.join(PROBE_FILES)})")
    probe.add_argument("--split", default="train", help="shapes-vqa split to draw samples from (default train)")
    probe.add_argument("--rows", type=int, default=1400, help="rows of that split to draw from (default 1400)")
    probe.add_argument("--batch-size", type=int, default=8)
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
    plan.add_argument("--k", type=int, default=None, help="number of layers whose visual tokens are frozen")
    plan.add_argument("--target", type=float, default=0.5, help="budget: decoder FLOPs share to reach (default 0.5)")
    plan.add_argument("--tolerance", type=float, default=None,
                      help="largest accuracy drop allowed, measured on held-out questions (shortv: chooses k; "
                           "greedy: default 0.01)")
    plan.add_argument("--samples", type=int, default=70, help="held-out shapes-vqa questions (default 70)")
    plan.add_argument("--split", default="test", help="held-out shapes-vqa split (default test)")
    plan.add_argument("--seed", type=int, default=0, help="seed of the random policy and the held-out questions")
    plan.add_argument("--out", type=Path, required=True, help="plan JSON file to write")
    plan.set_defaults(run=_plan)

    compare = commands.add_parser("compare", parents=[loading],
                                  help="accuracy vs FLOPs of the freezing policies and the frozen-text control")
    compare.add_argument("--lc", type=Path, required=True, help="lc.nc written by `eemllm probe`")
    compare.add_argument("--ks", type=int, nargs="+", default=[3, 6, 9], help="numbers of layers to freeze")
    compare.add_argument("--policies", nargs="+", default=["shortv", "cosine", "random", "text"],
                         help="policies to compare (default: shortv cosine random text)")
    compare.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the random policy")
    compare.add_argument("--samples", type=int, default=70, help="held-out shapes-vqa questions (default 70)")
    compare.add_argument("--split", default="test", help="held-out shapes-vqa split (default test)")
    compare.add_argument("--seed", type=int, default=0, help="seed of the held-out questions")
    compare.add_argument("--batch-size", type=int, default=16)
    compare.add_argument("--out", type=Path, required=True, help="CSV file to write")
    compare.set_defaults(run=_compare)

    flops = commands.add_parser("flops", help="prefill FLOPs of a model under a plan (offline for the paper models)")
    flops.add_argument("--model", required=True,
                       help="llava-1.5-7b, llava-1.5-13b, llava-next-7b, llava-next-13b, default, or a config path / "
                            "hub id")
    flops.add_argument("--plan", default=None, help="a preset (shortv:llava-1.5-7b, ...) or a plan JSON file")
    flops.add_argument("--convention", default="shortv", choices=("shortv", "full"),
                       help="shortv: the paper's attention + MLP count (default); full: every part of a generate() "
                            "call, prefill and per decoded token")
    flops.add_argument("--text-tokens", type=int, default=64, help="text tokens per prompt (default 64, as ShortV)")
    flops.add_argument("--visual-tokens", type=int, default=None,
                       help="visual tokens per prompt (default: the paper's 576 or 2880; full: --images x the "
                            "tower's tokens per image)")
    flops.add_argument("--images", type=int, default=1, help="full convention: images per prompt (default 1)")
    flops.set_defaults(run=_flops)

    latency = commands.add_parser("latency", parents=[loading],
                                  help="measure prefill time and decode tokens/s of the original and the planned model")
    latency.add_argument("--plan", required=True, help="a preset or a plan JSON file")
    latency.add_argument("--samples", type=int, default=8, help="shapes-vqa prompts per batch run (default 8)")
    latency.add_argument("--batch-size", type=int, default=None, help="prompts per forward (default: all of them)")
    latency.add_argument("--new-tokens", type=int, default=16, help="greedy tokens decoded per prompt (default 16)")
    latency.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    latency.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    latency.add_argument("--split", default="test", help="shapes-vqa split (default test)")
    latency.add_argument("--seed", type=int, default=0, help="seed of the prompts (default 0)")
    latency.add_argument("--out", type=Path, required=True, help="directory for latency.csv")
    latency.set_defaults(run=_latency)

    evaluate = commands.add_parser("evaluate", parents=[loading],
                                   help="answer a benchmark's questions (under a plan) and score them")
    evaluate.add_argument("--plan", default=None, help="a preset or a plan JSON file (default: no plan)")
    evaluate.add_argument("--benchmark", default="shapes-vqa",
                          help="shapes-vqa (built in, default), mmbench, mme, pope, textvqa, gqa, scienceqa-img or "
                               "seedbench (from --data or the HF cache)")
    evaluate.add_argument("--data", type=Path, default=None,
                          help="local copy of a public benchmark (its downloaded hub folder or one data file)")
    evaluate.add_argument("--samples", type=int, default=None,
                          help="number of questions (default: 140 of shapes-vqa, all of a public set)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the question sample (default 0)")
    evaluate.add_argument("--split", default=None, help="split (default: the benchmark's own, test for shapes-vqa)")
    evaluate.add_argument("--max-new-tokens", type=int, default=None,
                          help="answer length limit (default: 8 for shapes-vqa, 16 for public sets)")
    evaluate.add_argument("--batch-size", type=int, default=16)
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
    """Entry point of the ``eemllm`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as err:
        print(f"eemllm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
