"""Held-out discipline: choices on a selection set, scores on an evaluation set that shares no row."""

import datasets
import pytest

from analyses.demo import demo_sets
from analyses.choosing.heldout import HeldOutOverlap, check_disjoint, describe, shared_rows
from eemllm_models import load_shapes_vqa


def _user_set(ids, questions, split=None):
    columns = {"question": questions, "answer": ["yes"] * len(questions)}
    if ids is not None:
        columns["id"] = ids
    return datasets.Dataset.from_dict(columns, split=split)


def test_the_demo_chooses_and_scores_on_sets_that_share_no_id_and_no_scene():
    evaluation, selection, calibration = demo_sets(n=14, compare_samples=14, seed=0)
    assert (evaluation.split, selection.split, calibration.split) == ("test", "validation", "train")
    assert describe(selection) == {"dataset": "shapes-vqa", "split": "validation", "n": 14}
    for chosen_on in (selection, calibration):
        assert not set(chosen_on["id"]) & set(evaluation["id"])
        assert shared_rows(chosen_on.remove_columns("id"), evaluation.remove_columns("id"))[1] == []
        assert check_disjoint(chosen_on, evaluation) == 0


def test_overlapping_user_sets_are_refused_with_the_count_and_the_fix():
    selection = _user_set(["a", "b", "c", "d"], ["q1", "q2", "q3", "q4"], split="dev")
    evaluation = _user_set(["c", "d", "e"], ["q3", "q4", "q5"], split="eval")
    with pytest.raises(HeldOutOverlap, match=r"share 2 rows by id \(e.g. 'c'\).*validation split to choose.*"
                                             r"train_test_split.*allow_overlap=True") as caught:
        check_disjoint(selection, evaluation)
    assert "(dev, 4 rows)" in str(caught.value) and "(eval, 3 rows)" in str(caught.value)
    assert isinstance(caught.value, ValueError)
    with pytest.warns(UserWarning, match="share 2 rows"):
        assert check_disjoint(selection, evaluation, allow_overlap=True) == 2
    with pytest.raises(ValueError, match="pass --allow-overlap"):
        check_disjoint(selection, evaluation, fix="pass --allow-overlap")


def test_sets_without_ids_are_compared_by_content_images_included():
    selection = _user_set(None, ["same", "other"])
    evaluation = _user_set(None, ["same", "third"])
    with pytest.raises(HeldOutOverlap, match="share 1 rows by content"):
        check_disjoint(selection, evaluation)
    assert check_disjoint(_user_set(None, ["x"]), _user_set(None, ["y"])) == 0
    # the same scene re-labelled with a fresh id is still the same row when one side has no ids
    test = load_shapes_vqa("test", n=3)
    relabelled = test.remove_columns("id")
    assert shared_rows(relabelled, test)[0] == "content" and len(shared_rows(relabelled, test)[1]) == 3
    assert not shared_rows(load_shapes_vqa("validation", n=3).remove_columns("id"), test)[1]
