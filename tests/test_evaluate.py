import pandas as pd
import pytest

from analyses.evaluating.evaluate import answer_frame, scores
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


def test_streamed_rows_answer_like_the_data_set_and_the_bar_shows_the_total(default_model, capsys):
    from analyses.evaluating.benchmarks import benchmark_ranges, load_benchmark

    model, processor = default_model
    whole = answer_frame(model, processor, load_benchmark("shapes-vqa", n=5), batch_size=2, progress=False)
    streamed = answer_frame(model, processor, benchmark_ranges("shapes-vqa", n=5), batch_size=2)
    pd.testing.assert_frame_equal(streamed, whole)
    assert streamed.attrs == whole.attrs == {"benchmark": "shapes-vqa", "metric": "exact_match"}
    assert "5/5" in capsys.readouterr().err  # the bar counts questions against their total (with the time left)
    no_ids = load_shapes_vqa("test", n=3).remove_columns("id")
    assert list(answer_frame(model, processor, no_ids, batch_size=2, progress=False).id) == ["0", "1", "2"]
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        answer_frame(model, processor, no_ids, batch_size=0)
