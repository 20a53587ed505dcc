"""Held-out discipline: a plan is chosen on one set of questions and scored on another.

Everything that *chooses* (ShortV's k by tolerance, the greedy search, the policy comparison)
measures accuracy on a *selection* set; the final score is reported on an *evaluation* set the
choice never saw. For shapes-vqa that is the ``validation`` split and the ``test`` split (their
scenes come from disjoint seed streams). For a user's own data sets :func:`check_disjoint`
compares the two sets row by row: by the ``id`` column when both have one, else by the rows'
content (every column, images by their pixels), and refuses sets that share rows.
"""

from __future__ import annotations

import hashlib
import warnings

import datasets
import numpy as np
from PIL import Image

from eemllm_models import EfficiencyPlan

SELECTION_SPLIT = "validation"
"""The shapes-vqa split on which plans are chosen (tolerance-k, greedy, policy comparison)."""
EVALUATION_SPLIT = "test"
"""The shapes-vqa split on which the chosen plan's final score is reported."""


class HeldOutOverlap(ValueError):
    """A selection set and an evaluation set share rows."""


def split_name(data: datasets.Dataset) -> str:
    """The data set's split name (``"validation"``, ``"test"``, ...), or ``"unnamed"`` when it has none."""
    return str(data.split) if data.split is not None else "unnamed"


def describe(data: datasets.Dataset) -> dict[str, object]:
    """What to record next to an accuracy measured on ``data``: its ``dataset`` name, ``split`` and
    number of questions ``n``."""
    return {"dataset": data.info.dataset_name or "unnamed", "split": split_name(data), "n": len(data)}


def _content_key(value: object, digest) -> None:
    if isinstance(value, Image.Image):
        digest.update(f"image{value.size}{value.mode}".encode())
        digest.update(np.asarray(value).tobytes())
    elif isinstance(value, dict):
        for key in sorted(value):
            digest.update(str(key).encode())
            _content_key(value[key], digest)
    elif isinstance(value, (list, tuple)):
        digest.update(b"[")
        for item in value:
            _content_key(item, digest)
        digest.update(b"]")
    else:
        digest.update(repr(value).encode())


def row_keys(data: datasets.Dataset) -> tuple[str, list[str]]:
    """How rows are told apart, and one key per row: ``("id", ids)`` when ``data`` has an ``id``
    column, else ``("content", hashes)`` with the SHA-256 of each row's columns (images by pixels)."""
    if "id" in data.column_names:
        return "id", [str(i) for i in data["id"]]
    keys = []
    for row in data:
        digest = hashlib.sha256()
        _content_key(row, digest)
        keys.append(digest.hexdigest())
    return "content", keys


def shared_rows(selection: datasets.Dataset, evaluation: datasets.Dataset) -> tuple[str, list[str]]:
    """The keys (see :func:`row_keys`) of the rows both sets hold, and what they were compared by.

    Both sets must have an ``id`` column to be compared by id; otherwise both are compared by content.
    """
    if "id" in selection.column_names and "id" in evaluation.column_names:
        by, (_, a), (_, b) = "id", row_keys(selection), row_keys(evaluation)
    else:
        by = "content"
        a = row_keys(selection.remove_columns(["id"]) if "id" in selection.column_names else selection)[1]
        b = row_keys(evaluation.remove_columns(["id"]) if "id" in evaluation.column_names else evaluation)[1]
    common = set(a) & set(b)
    return by, [k for k in dict.fromkeys(b) if k in common]


def check_disjoint(selection: datasets.Dataset, evaluation: datasets.Dataset, allow_overlap: bool = False,
                   fix: str = "pass allow_overlap=True") -> int:
    """Refuse a selection set and an evaluation set that share rows; return how many they share.

    ``selection``: the rows a plan is chosen on; ``evaluation``: the rows its final score is
    reported on. Rows are matched by ``id`` when both sets have that column, else by content.
    Raises :class:`HeldOutOverlap` (a ``ValueError``) naming the number of shared rows and the
    fix; with ``allow_overlap`` it only warns (``UserWarning``). ``fix`` is how the caller's
    interface says "allow the overlap" (e.g. a CLI flag).
    """
    by, common = shared_rows(selection, evaluation)
    if not common:
        return 0
    example = f" (e.g. {common[0]!r})" if by == "id" else ""
    _refuse(f"the selection set ({split_name(selection)}, {len(selection)} rows) and the evaluation set "
            f"({split_name(evaluation)}, {len(evaluation)} rows) share {len(common)} rows by {by}{example}: a "
            "plan chosen on the questions it is scored on overstates its accuracy. Choose on rows the score "
            "never sees (for shapes-vqa: the validation split to choose, the test split to score; for your "
            f"own data: split it, e.g. Dataset.train_test_split), or {fix} to only warn", allow_overlap)
    return len(common)


def _refuse(message: str, allow_overlap: bool) -> None:
    """Raise :class:`HeldOutOverlap` with ``message``, or only warn with it when ``allow_overlap``."""
    if not allow_overlap:
        raise HeldOutOverlap(message)
    warnings.warn(message, UserWarning, stacklevel=3)


def check_plan_held_out(plan: EfficiencyPlan, dataset: str, split: str, allow_overlap: bool = False,
                        fix: str = "pass allow_overlap=True") -> None:
    """Refuse to score ``plan`` on the ``split`` of ``dataset`` when its provenance says it was chosen
    there (``selection``, as :func:`describe` records it): its score would overstate its accuracy.

    This is the check across commands (``eemllm plan`` chooses, ``eemllm evaluate`` scores later):
    the plan carries its selection set, so the evaluation can see it. Raises :class:`HeldOutOverlap`;
    with ``allow_overlap`` it only warns.
    """
    selection = plan.provenance.get("selection")
    if not isinstance(selection, dict) or (selection.get("dataset"), selection.get("split")) != (dataset, split):
        return
    _refuse(f"the plan was chosen on {selection.get('n', '?')} questions of {dataset} {split} (its provenance "
            f"says so), and would now be scored on the same split: choose on one split and score on another "
            f"(for shapes-vqa: choose on validation, score on test), or {fix} to only warn", allow_overlap)
