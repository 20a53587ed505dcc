import pandas as pd
import pytest

from analyses.evaluate import answer_frame, scores
from eemllm_models import load_shapes_vqa


def test_scores_give_accuracy_per_type_and_pope_metrics():
    frame = pd.DataFrame({"qtype": ["exists"] * 4 + ["count"] * 2, "answer": ["yes", "yes", "no", "no", "2", "3"],
                          "prediction": ["Yes", "no", "yes", "no", "2", "4"]})
    frame["correct"] = [True, False, False, True, True, False]
    result = scores(frame)
    assert result["exists"] == 0.5 and result["count"] == 0.5 and result["overall"] == 0.5
    assert result["yes_no_precision"] == 0.5 and result["yes_no_recall"] == 0.5 and result["yes_no_f1"] == 0.5
    assert result["yes_ratio"] == 0.5


def test_missing_answer_column_names_the_fix(default_model):
    model, processor = default_model
    data = load_shapes_vqa("test", n=2).remove_columns("answer")
    with pytest.raises(ValueError, match="no column 'answer'.*answer_column="):
        answer_frame(model, processor, data)
