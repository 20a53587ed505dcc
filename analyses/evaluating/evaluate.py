"""Benchmark evaluation: batched greedy answers on a ``datasets.Dataset``, per-sample outputs and scores.

The data set says how it is scored: a set from :func:`analyses.evaluating.benchmarks.load_benchmark` names
its benchmark in ``info.dataset_name``, whose metric is one of

- ``exact_match`` (shapes-vqa, GQA): the normalised prediction equals the answer;
- ``vqa_accuracy`` (TextVQA): ``min(#annotators who gave the prediction / 3, 1)`` after the
  standard VQA answer normalisation, as LLaVA-1.5's TextVQA evaluator counts it;
- ``choice`` (MMBench, ScienceQA-IMG, SEED-Bench): the option letter extracted from the
  prediction equals the answer letter;
- ``yes_no`` (POPE) and ``mme`` (MME): the yes/no read from the prediction equals the answer.

Any other data set is scored by exact match. :func:`scores` aggregates: accuracy per question
type and overall; POPE-style precision, recall, F1 and yes-ratio over the yes/no questions; the
share of groups answered entirely right (MME's acc+ images, MMBench's circular questions); and,
for MME, its per-category score (acc + acc+, x100) and perception and cognition totals.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from contextlib import nullcontext

import datasets
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm
from transformers import PreTrainedModel, ProcessorMixin

from eemllm_models import EfficiencyPlan, generate_answers
from eemllm_models.zoo.shapes_vqa import exact_match, normalize_answer

from analyses.evaluating.benchmarks import LETTERS, RowRanges, benchmark_spec

MME_CATEGORIES = {
    "perception": ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                   "artwork", "OCR"),
    "cognition": ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"),
}

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = dict(pair.split(":") for pair in (
    "aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've "
    "couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've "
    "hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's "
    "howd:how'd howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd "
    "itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't mightnt've:mightn't've "
    "mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've neednt:needn't notve:not've "
    "oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at shant:shan't "
    "shed've:she'd've she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't "
    "shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd somebodyd've:somebody'd've "
    "somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's someoned:someone'd "
    "someoned've:someone'd've someone'dve:someone'd've someonell:someone'll someones:someone's "
    "somethingd:something'd somethingd've:something'd've something'dve:something'd've "
    "somethingll:something'll thats:that's thered:there'd thered've:there'd've there'dve:there'd've "
    "therere:there're theres:there's theyd:they'd theyd've:they'd've they'dve:they'd've theyll:they'll "
    "theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've "
    "werent:weren't whatll:what'll whatre:what're whats:what's whatve:what've whens:when's whered:where'd "
    "wheres:where's whereve:where've whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll whos:who's "
    "whove:who've whyll:why'll whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't "
    "wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll "
    "yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've "
    "you'dve:you'd've youll:you'll youre:you're youve:you've").split())
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")
_DIGIT_COMMA = re.compile(r"(?<=\d),+(?=\d)")
_PERIOD = re.compile(r"\.(?!\d)")  # what the reference regex "(?!<=\d)(\.)(?!\d)" removes in effect


def normalize_vqa_answer(text: str) -> str:
    """The standard VQA answer normalisation (VQA/EvalAI/m4c): lower case, punctuation removed or
    spaced, periods not before a digit dropped, number words as digits, articles dropped,
    contractions given their apostrophe."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for mark in _PUNCTUATION:
        if f"{mark} " in text or f" {mark}" in text or _DIGIT_COMMA.search(text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    words = [_NUMBERS.get(w, w) for w in _PERIOD.sub("", out).lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """``min(#answers equal to the prediction / 3, 1)`` after :func:`normalize_vqa_answer`."""
    said = normalize_vqa_answer(prediction)
    return min(1.0, sum(normalize_vqa_answer(a) == said for a in answers) / 3)


def extract_choice(prediction: str, choices: Sequence[str]) -> str | None:
    """The option letter a free-form ``prediction`` picks among ``choices`` (lettered A, B, ...).

    In order: a bare or bracketed letter ("B", "(B)", "B."), a leading letter ("B. red"), the one
    option letter standing alone in the text ("The answer is B"; an "A" used as an article does
    not count), the one option whose text the prediction contains. None when none of these
    settles it.
    """
    letters = LETTERS[: len(choices)]
    text = prediction.strip()
    leading = re.match(r"\(?([A-Z])(?:[).:]|$|\s)", text)
    if leading and leading[1] in letters and not (leading[1] == "A" and re.match(r"A\s+[a-z]", text)):
        return leading[1]
    alone = {m[1] for m in re.finditer(r"\b([A-Z])\b", text)
             if m[1] in letters and not (m[1] == "A" and re.match(r"\s+[a-z]", text[m.end():]))}
    if len(alone) == 1:
        return alone.pop()
    named = [letter for letter, choice in zip(letters, choices) if choice and choice.lower() in text.lower()]
    return named[0] if len(named) == 1 else None


def parse_yes_no(prediction: str) -> str:
    """"yes", "no" or "other" from the first sentence of a prediction: its first word when that is
    yes or no, else "no" if it says no or not, else "yes" if it says yes."""
    words = re.findall(r"[a-z]+", prediction.lower().split(".")[0])
    if words and words[0] in ("yes", "no"):
        return words[0]
    if "no" in words or "not" in words:
        return "no"
    return "yes" if "yes" in words else "other"


def _score(metric: str, prediction: str, answer: str, choices: Sequence[str], answers: Sequence[str]) -> float:
    """One row's score in [0, 1] under ``metric`` (see the module docstring)."""
    if metric == "vqa_accuracy":
        return vqa_accuracy(prediction, answers or [answer])
    if metric == "choice" and choices:
        return float(extract_choice(prediction, choices) == answer.strip())
    if metric in ("yes_no", "mme"):
        return float(parse_yes_no(prediction) == normalize_answer(answer))
    return float(exact_match(prediction, answer))


def answer_frame(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    dataset: datasets.Dataset | RowRanges,
    plan: EfficiencyPlan | None = None,
    batch_size: int = 16,
    progress: bool = True,
    image_column: str = "image",
    question_column: str = "question",
    answer_column: str = "answer",
    label_column: str = "qtype",
    max_new_tokens: int | None = None,
) -> pd.DataFrame:
    """Answer every row of ``dataset`` (under ``plan`` when given) with greedy ``generate()``,
    ``batch_size`` padded prompts at a time, and score the answers with :func:`prediction_frame`
    (its columns and attrs).

    Rows are read one batch at a time (images decoded per batch); ``dataset`` may be a
    :class:`~analyses.evaluating.benchmarks.RowRanges` (such as
    :func:`~analyses.evaluating.benchmarks.benchmark_ranges`),
    which builds each batch only when it is answered, so memory stays flat in the number of rows.
    The progress bar counts questions and shows the time left. ``max_new_tokens`` defaults to the
    benchmark's (16; 8 for shapes-vqa and unregistered sets).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rows = dataset if isinstance(dataset, RowRanges) else RowRanges.of(dataset)
    for parameter, column in (("image_column", image_column), ("question_column", question_column),
                              ("answer_column", answer_column)):
        if column not in rows.column_names:
            raise ValueError(f"the data set has no column {column!r} (its columns: {rows.column_names}); "
                             f"name the right one with {parameter}=...")
    spec = benchmark_spec(rows.head)
    tokens = max_new_tokens or (spec.max_new_tokens if spec else 8)
    frames = []
    bar = tqdm(total=len(rows), desc="answering", unit="question",
               disable=not progress or len(rows) <= batch_size)
    with plan.applied(model) if plan is not None else nullcontext(), bar:
        for start, batch in rows.ranges(batch_size):
            images = [_rgb(image) for image in batch[image_column]]
            predictions = generate_answers(model, processor, images, list(batch[question_column]), batch_size,
                                           max_new_tokens=tokens, progress=False)
            frames.append(prediction_frame(batch, predictions, question_column, answer_column, label_column,
                                           first_row=start))
            bar.update(len(batch))
    if not frames:
        frames.append(prediction_frame(rows.head, [], question_column, answer_column, label_column))
    frame = pd.concat(frames, ignore_index=True)
    frame.attrs = dict(frames[0].attrs)
    return frame


def prediction_frame(
    dataset: datasets.Dataset,
    predictions: Sequence[str],
    question_column: str = "question",
    answer_column: str = "answer",
    label_column: str = "qtype",
    first_row: int = 0,
) -> pd.DataFrame:
    """Score ``predictions[i]`` (a model's answer to row ``i`` of ``dataset``) by the data set's metric.

    Returns one row per sample: ``id`` (the id column, else the row number, counted from
    ``first_row`` when ``dataset`` is a range of a larger set), ``qtype`` (the label column, or
    "all"), ``question``, ``answer``, ``prediction``, ``score`` (in [0, 1]), ``correct`` (score 1)
    and ``group`` (the group column, else the id); ``frame.attrs`` holds the ``benchmark``
    (``dataset.info.dataset_name``) and its ``metric``.
    """
    if len(predictions) != len(dataset):
        raise ValueError(f"got {len(predictions)} predictions for {len(dataset)} rows; pass one per row")
    spec = benchmark_spec(dataset)
    metric = spec.metric if spec else "exact_match"
    columns = dataset.column_names
    ids = [str(i) for i in dataset["id"]] if "id" in columns else \
        [str(i) for i in range(first_row, first_row + len(dataset))]
    answers = [str(a) for a in dataset[answer_column]]
    choices = list(dataset["choices"]) if "choices" in columns else [[]] * len(dataset)
    references = list(dataset["answers"]) if "answers" in columns else [[a] for a in answers]
    frame = pd.DataFrame({
        "id": ids,
        "qtype": list(dataset[label_column]) if label_column in columns else ["all"] * len(dataset),
        "question": list(dataset[question_column]),
        "answer": answers,
        "prediction": list(predictions),
        "score": [_score(metric, p, a, c, r) for p, a, c, r in zip(predictions, answers, choices, references)],
    })
    frame["correct"] = frame.score == 1.0
    frame["group"] = [str(g) for g in dataset["group"]] if "group" in columns else ids
    frame.attrs.update(benchmark=dataset.info.dataset_name or "", metric=metric)
    return frame


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def scores(frame: pd.DataFrame) -> dict[str, float]:
    """Scores of an :func:`answer_frame` frame.

    Accuracy (mean ``score``, else mean ``correct``) per ``qtype`` and ``overall``;
    ``yes_no_precision``/``recall``/``f1``/``yes_ratio`` over the rows whose reference answer is
    yes or no ("yes" the positive class, the prediction read by :func:`parse_yes_no`; absent when
    there are none). A metric that does not apply is NaN (the report shows "n/a"), never 0:
    precision, recall and F1 when no reference answer is yes; precision when the model never says
    yes (F1, ``2TP / (2TP + FP + FN)``, is then 0). ``group_accuracy``, the share of groups whose
    rows are all correct, when some group has several rows; and for MME
    (``frame.attrs["metric"] == "mme"``) ``mme/<category>`` (acc + acc+ in percent, 0-200) and
    the ``mme_perception`` and ``mme_cognition`` sums over the categories present.
    """
    value = frame.score if "score" in frame.columns else frame.correct.astype(float)
    result = {str(q): float(v.mean()) for q, v in value.groupby(frame.qtype)}
    result["overall"] = float(value.mean())
    truth = frame.answer.map(normalize_answer)
    yes_no = truth.isin(["yes", "no"])
    if yes_no.any():
        said_yes = frame.prediction[yes_no].map(parse_yes_no) == "yes"
        is_yes = truth[yes_no] == "yes"
        true_positive = float((said_yes & is_yes).sum())
        applies = bool(is_yes.any())
        precision = true_positive / said_yes.sum() if applies and said_yes.any() else math.nan
        recall = true_positive / is_yes.sum() if applies else math.nan
        missed, false_alarms = float((~said_yes & is_yes).sum()), float((said_yes & ~is_yes).sum())
        f1 = 2 * true_positive / (2 * true_positive + false_alarms + missed) if applies else math.nan
        result.update(yes_no_precision=float(precision), yes_no_recall=float(recall), yes_no_f1=float(f1),
                      yes_ratio=float(said_yes.mean()))
    if "group" in frame.columns and frame.group.duplicated().any():
        result["group_accuracy"] = float(frame.correct.groupby(frame.group).all().mean())
    if frame.attrs.get("metric") == "mme":
        result.update(mme_scores(frame))
    return result


def mme_scores(frame: pd.DataFrame) -> dict[str, float]:
    """MME's score: per category the mean over its images of acc + acc+ (x100: the share of the
    image's questions answered right, plus 100 when all are), as ``mme/<category>``; their sums
    over the perception and cognition categories present, as ``mme_perception`` and ``mme_cognition``.
    """
    per_image = frame.groupby(["qtype", "group"]).correct.agg(["mean", "all"])
    by_category = (100 * (per_image["mean"] + per_image["all"])).groupby(level="qtype").mean()
    result = {f"mme/{category}": float(v) for category, v in by_category.items()}
    for side, categories in MME_CATEGORIES.items():
        result[f"mme_{side}"] = float(sum(v for c, v in by_category.items() if c in categories))
    return result
