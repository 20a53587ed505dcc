"""``eemllm``: the command-line face of the toolkit (a thin layer over the library functions)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from eemllm_models.zoo import shapes_vqa


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(args.out, n=args.n, seed=args.seed, probe_samples=args.probe_samples, overwrite=args.overwrite)
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
    print(f"wrote {args.out}: demo_answers.csv, demo_summary.json, lc.nc, plan.json, pruned-model/")
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
    model, processor = _load(args.model)
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

    from .policies import freeze_plan

    lc = probes.open_result(args.lc, probe="layer_contribution")
    plan = freeze_plan(lc, args.k, args.policy, args.seed)
    path = plan.save(args.out)
    print(f"{args.policy}: freeze visual tokens in layers {sorted(plan.layers('frozen'))}; wrote {path}")
    return 0


def _flops(args: argparse.Namespace) -> int:
    from eemllm_models import EfficiencyPlan

    from .flops import load_config, shortv_convention_flops

    config = load_config(args.model)
    n_layers = config.get_text_config().num_hidden_layers
    plan = _plan_for(n_layers, args.plan)
    original = shortv_convention_flops(config, EfficiencyPlan.empty(n_layers), args.text_tokens, args.visual_tokens)
    planned = shortv_convention_flops(config, plan, args.text_tokens, args.visual_tokens)
    print(f"{args.model}, plan {args.plan or 'none'} ({len(plan.layers('frozen'))} frozen layers), "
          "ShortV convention (attention + MLP):")
    print(f"  original {original / 1e12:.1f} TFLOPs, planned {planned / 1e12:.1f} TFLOPs "
          f"({planned / original:.0%}), FLOPs-ideal speedup {original / planned:.2f}x")
    return 0


def _load(model: str):
    from eemllm_models import load_default, load_model

    return load_default() if model == "default" else load_model(model)


def _plan_for(model, plan: str | None):
    """The plan named on the command line for ``model`` (a loaded model or a layer count): a preset,
    a JSON file, or none (all layers full)."""
    from eemllm_models import EfficiencyPlan

    if plan is None:
        return EfficiencyPlan.uniform(model, "full")
    return EfficiencyPlan.load(plan) if Path(plan).is_file() else EfficiencyPlan.preset(plan)


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from eemllm_models import load_shapes_vqa
    from eemllm_models.files import atomic_write, atomic_write_text

    from .evaluate import answer_frame, scores

    model, processor = _load(args.model)
    plan = _plan_for(model, args.plan)
    frame = answer_frame(model, processor, load_shapes_vqa(args.split, n=args.samples, seed=args.seed), plan=plan,
                         batch_size=args.batch_size)
    result = scores(frame)
    atomic_write(args.out / "answers.csv", lambda tmp: frame.to_csv(tmp, index=False))
    atomic_write_text(args.out / "scores.json", json.dumps({"plan": plan.to_dict(), "scores": result}, indent=1) + "\n")
    for name, value in result.items():
        print(f"{name:>17}: {value:.3f}")
    print(f"wrote {args.out / 'answers.csv'} and {args.out / 'scores.json'}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    from eemllm_models import save_pruned

    model, processor = _load(args.model)
    plan = _plan_for(model, args.plan)
    path = save_pruned(model, plan, args.out, processor=processor, overwrite=args.overwrite)
    print(f"wrote {path} ({len(plan.modes) - len(plan.layers('full'))} of {plan.n_layers} layers changed); "
          "load it with eemllm_models.load_pruned")
    return 0


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def build_parser() -> argparse.ArgumentParser:
    """The ``eemllm`` argument parser with one sub-command per job."""
    parser = argparse.ArgumentParser(prog="eemllm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the main job on the embedded default model")
    demo.add_argument("--out", type=Path, required=True, help="directory for the demo's results")
    demo.add_argument("--n", type=int, default=28, help="number of shapes-vqa test questions (default 28)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the test split (default 0)")
    demo.add_argument("--probe-samples", type=int, default=16,
                      help="train-split prompts for the Layer Contribution probe (default 16)")
    demo.add_argument("--overwrite", action="store_true", help="replace a pruned model left in --out")
    demo.set_defaults(run=_demo)

    probe = commands.add_parser("probe", help="measure Layer Contribution, mode contributions and attention "
                                              "statistics on shapes-vqa (shard with torchrun/accelerate launch)")
    probe.add_argument("--model", default="default", help="model directory or hub name (default: the embedded one)")
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

    plan = commands.add_parser("plan", help="turn a Layer Contribution result into an efficiency plan")
    plan.add_argument("--lc", type=Path, required=True, help="lc.nc written by `eemllm probe`")
    plan.add_argument("--k", type=int, required=True, help="number of layers whose visual tokens are frozen")
    plan.add_argument("--policy", default="shortv", help="shortv (lowest visual LC, default), cosine or random")
    plan.add_argument("--seed", type=int, default=0, help="seed of the random policy")
    plan.add_argument("--out", type=Path, required=True, help="plan JSON file to write")
    plan.set_defaults(run=_plan)

    flops = commands.add_parser("flops", help="prefill FLOPs of a model under a plan (offline for the paper models)")
    flops.add_argument("--model", required=True,
                       help="llava-1.5-7b, llava-1.5-13b, llava-next-7b, llava-next-13b, or a config path / hub id")
    flops.add_argument("--plan", default=None, help="a preset (shortv:llava-1.5-7b, ...) or a plan JSON file")
    flops.add_argument("--text-tokens", type=int, default=64, help="text tokens per prompt (default 64, as ShortV)")
    flops.add_argument("--visual-tokens", type=int, default=None,
                       help="visual tokens per prompt (default: the paper's 576 or 2880)")
    flops.set_defaults(run=_flops)

    evaluate = commands.add_parser("evaluate", help="answer shapes-vqa questions (under a plan) and score them")
    evaluate.add_argument("--model", default="default", help="model directory or hub name (default: the embedded one)")
    evaluate.add_argument("--plan", default=None, help="a preset or a plan JSON file (default: no plan)")
    evaluate.add_argument("--samples", type=int, default=140, help="number of questions (default 140)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    evaluate.add_argument("--split", default="test", help="shapes-vqa split (default test)")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--out", type=Path, required=True, help="directory for answers.csv and scores.json")
    evaluate.set_defaults(run=_evaluate)

    prune = commands.add_parser("prune", help="save a model with a plan as a training-free pruned model")
    prune.add_argument("--model", default="default", help="model directory or hub name (default: the embedded one)")
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
