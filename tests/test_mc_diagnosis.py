import pytest

from analyses.evaluating.mc_diagnosis import (
    SHOWN_COLUMNS,
    by_options_shown,
    copyable_share,
    mc_scenes,
    options_shown,
    stated,
)
from eemllm_models import load_shapes_vqa
from eemllm_models.zoo import shapes_vqa


def test_stated_puts_the_answers_option_in_words_before_the_question():
    test = load_shapes_vqa("test", n=200).filter(lambda row: row["qtype"] == "mc")
    for question, answer, choices in zip(test["question"][:5], test["answer"][:5], test["choices"][:5]):
        text = stated(question, answer, choices)
        fact, rest = text.split("\n", 1)
        option = next(line.split(". ", 1)[1] for line in question.split("\n") if line.startswith(f"{answer}. "))
        assert rest == question and fact == f"Fact: the answer to '{question.splitlines()[0]}' is {option}."


def test_training_conversations_leave_almost_no_mc_turn_copyable():
    copyable, total = copyable_share(scenes=200, extra_mc=3)
    assert total == 200 * 4 and copyable / total < 0.01
    assert copyable_share(scenes=50, extra_mc=0) == (0, 50)


def test_options_shown_always_counts_the_truth_and_the_table_pools_the_groups():
    rows = mc_scenes("test", 700)
    test = load_shapes_vqa("test", n=700)
    assert [i for i, _ in rows] == [i for i, q in enumerate(test["qtype"]) if q == "mc"]
    scenes = [scene for _, scene in rows]
    questions = [s.questions[-1] for s in scenes]
    assert [q.question for q in questions] == [test["question"][i] for i, _ in rows]
    shown = [options_shown(q, s) for q, s in zip(questions, scenes)]
    assert all(flags[shapes_vqa.MC_LETTERS.index(q.answer)] for q, flags in zip(questions, shown))

    right = by_options_shown(scenes, [q.answer for q in questions])
    assert list(right.columns) == list(SHOWN_COLUMNS) and right.shown.iloc[-1] == "all"
    assert (right.accuracy == 1.0).all() and (right.wrong_shown == 0).all()
    assert right.n.iloc[-1] == len(scenes) == right.n.iloc[:-1].sum()
    assert abs(right.if_any_shown.iloc[-1] - sum(1 / sum(f) for f in shown) / len(shown)) < 1e-12
    assert list(right.if_any_shown.iloc[:-1]) == pytest.approx([1 / k for k in right.shown.iloc[:-1]])

    always_a = by_options_shown(scenes, ["A."] * len(scenes))
    wrong_shown = sum(flags[0] and q.answer != "A" for q, flags in zip(questions, shown))
    assert always_a.hits.iloc[-1] == sum(q.answer == "A" for q in questions)
    assert always_a.wrong_shown.iloc[-1] == wrong_shown
