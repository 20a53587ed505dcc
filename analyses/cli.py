"""``eemllm``: the command-line face of the toolkit (a thin layer over the library functions)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from eemllm_models.zoo import shapes_vqa


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    frame = run_demo(args.out, n=args.n, seed=args.seed)
    print(frame[["qtype", "question", "answer", "prediction", "correct"]]
          .assign(question=frame.question.str.split("\n").str[0]).to_string(index=False))
    print()
    for qtype, group in frame.groupby("qtype"):
        print(f"{qtype:>9}: {group.correct.mean():6.1%}  (chance {shapes_vqa.CHANCE[qtype]:.0%}, n={len(group)})")
    print(f"  overall: {frame.correct.mean():6.1%}  (n={len(frame)})")
    print(f"wrote {args.out / 'demo_answers.csv'} and {args.out / 'demo_summary.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``eemllm`` argument parser with one sub-command per job."""
    parser = argparse.ArgumentParser(prog="eemllm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the main job on the embedded default model")
    demo.add_argument("--out", type=Path, required=True, help="directory for the demo's results")
    demo.add_argument("--n", type=int, default=28, help="number of shapes-vqa test questions (default 28)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the test split (default 0)")
    demo.set_defaults(run=_demo)
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
