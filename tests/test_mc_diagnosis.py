from analyses.evaluating.mc_diagnosis import copyable_share, stated
from eemllm_models import load_shapes_vqa


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
