"""Benchmark evaluation: batched greedy answers on a ``datasets.Dataset``, per-sample outputs and scores.

Metrics: exact-match accuracy per question type and overall; for yes/no questions (POPE-style)
precision, recall and F1 with "yes" as the positive class, and the share of "yes" answers.
"""

from __future__ import annotations

import datasets
import pandas as pd
from transformers import PreTrainedModel, ProcessorMixin

from eemllm_models import EfficiencyPlan, generate_answers
from eemllm_models.zoo.shapes_vqa import exact_match, normalize_answer


def answer_frame(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    dataset: datasets.Dataset,
    plan: EfficiencyPlan | None = None,
    batch_size: int = 16,
    progress: bool = True,
    image_column: str = "image",
    question_column: str = "question",
    answer_column: str = "answer",
    label_column: str = "qtype",
) -> pd.DataFrame:
    """Answer every row of ``dataset`` (under ``plan`` when given) with greedy ``generate()``.

    Returns one row per sample: ``id``, ``qtype`` (the label column, or "all"), ``question``,
    ``answer``, ``prediction``, ``correct`` (exact match).
    """
    for parameter, column in (("image_column", image_column), ("question_column", question_column),
                              ("answer_column", answer_column)):
        if column not in dataset.column_names:
            raise ValueError(f"the data set has no column {column!r} (its columns: {dataset.column_names}); "
                             f"name the right one with {parameter}=...")
    images, questions = list(dataset[image_column]), list(dataset[question_column])
    if plan is None:
        predictions = generate_answers(model, processor, images, questions, batch_size, progress=progress)
    else:
        with plan.applied(model):
            predictions = generate_answers(model, processor, images, questions, batch_size, progress=progress)
    frame = pd.DataFrame({
        "id": dataset["id"] if "id" in dataset.column_names else [str(i) for i in range(len(dataset))],
        "qtype": dataset[label_column] if label_column in dataset.column_names else ["all"] * len(dataset),
        "question": questions,
        "answer": [str(a) for a in dataset[answer_column]],
        "prediction": predictions,
    })
    frame["correct"] = [exact_match(p, a) for p, a in zip(frame.prediction, frame.answer)]
    return frame


def scores(frame: pd.DataFrame) -> dict[str, float]:
    """Accuracy per ``qtype`` and ``overall``; ``yes_no_precision``/``recall``/``f1``/``yes_ratio`` over the
    rows whose reference answer is yes or no (absent when there are none; 0 where a ratio has
    nothing to count, as when no "yes" was answered)."""
    result = {str(q): float(g.correct.mean()) for q, g in frame.groupby("qtype")}
    result["overall"] = float(frame.correct.mean())
    truth = frame.answer.map(normalize_answer)
    yes_no = truth.isin(["yes", "no"])
    if yes_no.any():
        said_yes = frame.prediction[yes_no].map(normalize_answer) == "yes"
        is_yes = truth[yes_no] == "yes"
        true_positive = float((said_yes & is_yes).sum())
        precision = true_positive / said_yes.sum() if said_yes.any() else 0.0
        recall = true_positive / is_yes.sum() if is_yes.any() else 0.0
        result.update(yes_no_precision=float(precision), yes_no_recall=float(recall),
                      yes_no_f1=float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0,
                      yes_ratio=float(said_yes.mean()))
    return result
