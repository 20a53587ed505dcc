import hashlib

import numpy as np
import pytest

from eemllm_models import load_shapes_vqa
from eemllm_models.zoo import shapes_vqa


def _image_hashes(data):
    return [hashlib.sha256(np.asarray(im).tobytes()).hexdigest() for im in data["image"]]


def test_same_seed_gives_identical_rows():
    a, b = load_shapes_vqa("test", n=21, seed=3), load_shapes_vqa("test", n=21, seed=3)
    for column in ("id", "question", "answer", "qtype", "choices"):
        assert a[column] == b[column]
    assert _image_hashes(a) == _image_hashes(b)


def test_other_seed_gives_other_data():
    a, b = load_shapes_vqa("test", n=14, seed=0), load_shapes_vqa("test", n=14, seed=1)
    assert not set(_image_hashes(a)) & set(_image_hashes(b))


def test_train_and_test_splits_are_disjoint():
    train, test = load_shapes_vqa("train", n=300), load_shapes_vqa("test", n=300)
    assert not set(_image_hashes(train)) & set(_image_hashes(test))
    assert not set(train["id"]) & set(test["id"])


def test_columns_and_question_types():
    data = load_shapes_vqa("test", n=70)
    assert set(data.column_names) == {"id", "image", "question", "answer", "qtype", "choices"}
    assert data[0]["image"].size == (160, 160)
    assert sorted(set(data["qtype"])) == sorted(shapes_vqa.QTYPES)
    for row in data:
        if row["qtype"] == "mc":
            assert len(row["choices"]) == 4 and row["answer"] in "ABCD"
            assert row["question"].endswith(shapes_vqa.MC_INSTRUCTION)
        else:
            assert row["choices"] == []
        assert " " not in row["answer"]


def test_answers_follow_the_scene():
    for i in range(50):
        scene = shapes_vqa.make_scene(shapes_vqa.scene_rng("train", i))
        q = {q.qtype: q for q in scene.questions}
        assert q["count"].answer == str(len(scene.shapes))
        assert q["read"].answer == scene.character.shape
        by_cell = {s.cell: s for s in scene.shapes}
        position = shapes_vqa.POSITIONS.index(q["color_at"].question.split("at the ")[1].rstrip("?"))
        assert by_cell[position].color == q["color_at"].answer
        assert len({(s.color, s.shape) for s in scene.shapes}) == len(scene.shapes)


def test_every_answer_type_is_balanced_enough_to_measure_chance():
    data = load_shapes_vqa("train", n=7 * 200)
    yes = [a for a, t in zip(data["answer"], data["qtype"]) if t == "exists"]
    assert 0.35 < yes.count("yes") / len(yes) < 0.65
    letters = [a for a, t in zip(data["answer"], data["qtype"]) if t == "mc"]
    assert set(letters) == set("ABCD")


def test_exact_match_normalises_case_and_punctuation():
    assert shapes_vqa.exact_match(" Red.", "red")
    assert not shapes_vqa.exact_match("red square", "red")
    assert shapes_vqa.accuracy(["a", "a", "b"], ["x", "y", "z"], ["x", "x", "z"]) == {
        "a": 0.5, "b": 1.0, "overall": pytest.approx(2 / 3)}


def test_unknown_split_and_bad_size_are_clear_errors():
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_shapes_vqa("dev", n=2)
    with pytest.raises(ValueError, match="non-negative"):
        load_shapes_vqa("test", n=-1)


@pytest.mark.parametrize("seed", [0, 5])
def test_train_validation_and_test_are_disjoint_by_id_and_by_scene(seed):
    splits = {name: load_shapes_vqa(name, n=140, seed=seed) for name in ("train", "validation", "test")}
    for name, data in splits.items():
        assert data.split == name and data[0]["id"] == f"{name}-{seed}-0"
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not set(splits[a]["id"]) & set(splits[b]["id"]), (a, b)
            assert not set(_image_hashes(splits[a])) & set(_image_hashes(splits[b])), (a, b)
    validation = splits["validation"]
    assert sorted(set(validation["qtype"])) == sorted(shapes_vqa.QTYPES)
    assert validation["question"] == load_shapes_vqa("validation", n=140, seed=seed)["question"]


def test_a_range_of_rows_is_the_same_rows_and_an_empty_range_is_an_empty_set():
    whole = load_shapes_vqa("validation", n=6, seed=2)
    part = load_shapes_vqa("validation", n=3, seed=2, start=2)
    assert part["id"] == whole["id"][2:5] and part["question"] == whole["question"][2:5]
    assert len(load_shapes_vqa("test", n=0)) == 0 and load_shapes_vqa("test", n=0).features == whole.features


def test_another_question_is_drawn_about_the_same_scene():
    scene = shapes_vqa.make_scene(shapes_vqa.scene_rng("train", 11))
    rng = np.random.default_rng(0)
    names = {f"{s.color} {s.shape}" for s in scene.shapes}
    for _ in range(20):
        mc = shapes_vqa.another_question(scene, "mc", rng)
        item = next(s for s in scene.shapes if s.cell == mc.cells[0])
        assert mc.choices[shapes_vqa.MC_LETTERS.index(mc.answer)] in (item.color, item.shape)
        relation = shapes_vqa.another_question(scene, "relation", rng)
        a, b = (scene.shapes[[s.cell for s in scene.shapes].index(c)] for c in relation.cells)
        assert {f"{a.color} {a.shape}", f"{b.color} {b.shape}"} <= names
        assert relation.answer in ("left", "right", "above", "below")
    with pytest.raises(ValueError, match="cannot draw another 'count' question; choose one of"):
        shapes_vqa.another_question(scene, "count", rng)


def test_a_training_conversation_never_lets_multiple_choice_copy_an_earlier_turn():
    rng = np.random.default_rng(0)
    firsts = set()
    for index in range(300):
        scene = shapes_vqa.make_scene(shapes_vqa.scene_rng("train", index))
        turns = shapes_vqa.conversation(scene, {"mc": 3, "relation": 2}, rng)
        assert sorted(q.qtype for q in turns) == sorted([*shapes_vqa.QTYPES, "mc", "mc", "mc", "relation", "relation"])
        assert set(scene.questions) <= set(turns)
        firsts.add(turns[0].qtype)
        seen = set()
        for q in turns:
            if q.qtype == "mc" and len(scene.shapes) > 2:
                assert shapes_vqa.asks(q) not in seen
            seen.add(shapes_vqa.asks(q))
    assert firsts == set(shapes_vqa.QTYPES)


def test_multiple_choice_from_the_scene_takes_its_wrong_options_from_the_other_shapes_first():
    rng = np.random.default_rng(0)
    redrawn = 0
    for index in range(200):
        scene = shapes_vqa.make_scene(shapes_vqa.scene_rng("train", index))
        turns = shapes_vqa.conversation(scene, {"mc": 2}, rng, mc_from_scene=True)
        assert [q for q in turns if q.qtype != "mc"] and {q for q in turns if q.qtype != "mc"} <= set(scene.questions)
        redrawn += scene.questions[-1] not in turns
        for q in (q for q in turns if q.qtype == "mc"):
            cell, attribute = shapes_vqa.asks(q)
            item = next(s for s in scene.shapes if s.cell == cell)
            truth = getattr(item, attribute)
            elsewhere = {getattr(s, attribute) for s in scene.shapes if s is not item} - {truth}
            assert q.choices[shapes_vqa.MC_LETTERS.index(q.answer)] == truth and len(set(q.choices)) == 4
            assert len(elsewhere & set(q.choices)) == min(3, len(elsewhere))
    assert redrawn > 150  # the scene's own mc turn is drawn again, from the scene
