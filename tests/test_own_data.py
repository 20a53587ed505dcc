"""Your own data from the CLI: ``eemllm probe``/``evaluate --data PATH`` (a save_to_disk folder, a parquet
file, a jsonl file) with ``--image-column/--question-column/--answer-column``, like the Python API.

Each format holds the same few shapes-vqa rows under other column names, written to ``tmp_path``; the
CLI's answers and Layer Contribution must equal the Python API's on the original rows.
"""

import io
import json

import datasets
import numpy as np
import pandas as pd
import pytest
import xarray as xr

import probes
from analyses.evaluating.benchmarks import load_local_dataset
from analyses.cli import main
from analyses.evaluating.evaluate import answer_frame
from eemllm_models import load_shapes_vqa

FORMATS = ("save_to_disk", "parquet", "jsonl")
RENAMED = {"image": "img", "question": "prompt", "answer": "label"}
COLUMN_FLAGS = ["--image-column", "img", "--question-column", "prompt", "--answer-column", "label"]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Keep the parquet/json readers' cache out of the user's."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")


@pytest.fixture(scope="module")
def source():
    return load_shapes_vqa("test", n=4, seed=5)


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write(fmt: str, source: datasets.Dataset, folder) -> str:
    """``source`` with renamed columns as ``fmt``: images as the Image feature (save_to_disk), raw PNG bytes
    (a parquet file written by pandas) or PNG files named relative to the jsonl file."""
    if fmt == "save_to_disk":
        source.rename_columns(RENAMED).save_to_disk(folder / "disk")
        return str(folder / "disk")
    rows = [{"id": r["id"], "prompt": r["question"], "label": r["answer"], "qtype": r["qtype"]} for r in source]
    if fmt == "parquet":
        frame = pd.DataFrame(rows).assign(img=[_png(image) for image in source["image"]])
        frame.to_parquet(folder / "data.parquet")
        return str(folder / "data.parquet")
    (folder / "images").mkdir()
    with (folder / "data.jsonl").open("w") as f:
        for k, (row, image) in enumerate(zip(rows, source["image"])):
            image.save(folder / "images" / f"{k}.png")
            f.write(json.dumps({**row, "img": f"images/{k}.png"}) + "\n")
    return str(folder / "data.jsonl")


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_loads_with_its_images(fmt, source, tmp_path):
    data = load_local_dataset(write(fmt, source, tmp_path), image_column="img")
    assert len(data) == len(source) and isinstance(data.features["img"], datasets.Image)
    assert data["prompt"] == source["question"] and data["label"] == source["answer"]
    for mine, theirs in zip(data["img"], source["image"]):
        assert np.array_equal(np.asarray(mine.convert("RGB")), np.asarray(theirs))


def test_bad_local_data_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no data at .*give a datasets save_to_disk folder"):
        load_local_dataset(tmp_path / "missing.jsonl")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="cannot read .*notes.txt: give a datasets save_to_disk folder"):
        load_local_dataset(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a save_to_disk folder"):
        load_local_dataset(tmp_path / "empty")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "nowhere.png", "question": "q"}) + "\n")
    with pytest.raises(ValueError, match="row 0 .*has no readable image"):
        load_local_dataset(tmp_path / "bad.jsonl")


@pytest.mark.parametrize("fmt", FORMATS)
def test_evaluate_scores_your_own_data(fmt, source, tmp_path, default_model):
    model, processor = default_model
    expected = answer_frame(model, processor, source, batch_size=4, progress=False)
    out = tmp_path / "e"
    assert main(["evaluate", "--data", write(fmt, source, tmp_path), *COLUMN_FLAGS, "--out", str(out)]) == 0
    answers = pd.read_csv(out / "answers.csv", keep_default_na=False, dtype=str)
    assert list(answers.prediction) == list(expected.prediction) and list(answers.id) == source["id"]
    assert json.loads((out / "scores.json").read_text())["scores"]["overall"] == pytest.approx(expected.correct.mean())


def test_probe_measures_your_own_data_like_the_python_api(source, tmp_path, default_model, capsys):
    model, processor = default_model
    path = write("jsonl", source, tmp_path)
    out = tmp_path / "p"
    assert main(["probe", "--data", path, *COLUMN_FLAGS, "--probes", "lc", "--samples", "3", "--batch-size", "2",
                 "--out", str(out)]) == 0
    expected = probes.layer_contribution(model, processor, source, samples=3, batch_size=2, progress=False)
    got = xr.load_dataset(out / "lc.nc")
    assert list(got.sample.values) == list(expected.sample.values)
    np.testing.assert_allclose(got.lc.values, expected.lc.values, rtol=1e-4, atol=1e-7)


def test_missing_columns_and_too_many_samples_name_the_flag(source, tmp_path, capsys):
    path = write("parquet", source, tmp_path)
    assert main(["evaluate", "--data", path, "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "has no column 'image'" in err and "name the right one with --image-column" in err
    assert main(["probe", "--data", path, "--image-column", "img", "--out", str(tmp_path / "p")]) == 2
    assert "name the right one with --question-column" in capsys.readouterr().err
    assert main(["probe", "--data", path, *COLUMN_FLAGS, "--samples", "10", "--out", str(tmp_path / "p")]) == 2
    assert "--samples 10 is more than the 4 rows of" in capsys.readouterr().err
    assert main(["evaluate", "--benchmark", "shapes-vqa", "--data", path, "--out", str(tmp_path / "e")]) == 2
    assert "drop --data, or drop --benchmark" in capsys.readouterr().err
    assert not (tmp_path / "e").exists() and not (tmp_path / "p").exists()


def _lc_file(model, processor, source, folder) -> str:
    lc = probes.layer_contribution(model, processor, source, samples=3, batch_size=2, progress=False)
    return str(probes.save_result(lc, folder / "lc.nc"))


def test_compare_measures_the_policies_on_your_own_data_like_the_python_api(source, tmp_path, default_model, capsys):
    from analyses.choosing.compare import compare_policies
    from analyses.measuring.tokens import dataset_token_counts

    model, processor = default_model
    lc_path = _lc_file(model, processor, source, tmp_path)
    out = tmp_path / "compare.csv"
    assert main(["compare", "--lc", lc_path, "--data", write("jsonl", source, tmp_path), *COLUMN_FLAGS,
                 "--ks", "2", "--policies", "shortv", "random", "--seeds", "0", "--out", str(out)]) == 0
    assert "accuracy on " + str((tmp_path / "data.jsonl").resolve()) in capsys.readouterr().out
    expected = compare_policies(model, processor, source, probes.open_result(lc_path), [2],
                                dataset_token_counts(model, processor, source), ["shortv", "random"], [0],
                                progress=False)
    got = pd.read_csv(out, keep_default_na=False, dtype={"outcomes": str})
    assert list(got.outcomes) == list(expected.outcomes) and list(got.n) == [len(source)] * len(got)
    np.testing.assert_allclose(got.flops_ratio, expected.flops_ratio)


def test_a_plan_chosen_on_your_own_data_records_it_and_is_not_scored_on_it(source, tmp_path, default_model, capsys):
    from eemllm_models import EfficiencyPlan

    model, processor = default_model
    lc_path = _lc_file(model, processor, source, tmp_path)
    data = write("parquet", source, tmp_path)
    plan_path = tmp_path / "plan.json"
    assert main(["plan", "--lc", lc_path, "--tolerance", "0.5", "--data", data, *COLUMN_FLAGS,
                 "--out", str(plan_path)]) == 0
    selection = EfficiencyPlan.load(plan_path).provenance["selection"]
    assert selection["dataset"] == str((tmp_path / "data.parquet").resolve()) and selection["n"] == len(source)
    capsys.readouterr()
    evaluated = ["evaluate", "--data", data, *COLUMN_FLAGS, "--plan", str(plan_path), "--out", str(tmp_path / "e")]
    assert main(evaluated) == 2
    assert "the plan was chosen on 4 questions of" in capsys.readouterr().err and not (tmp_path / "e").exists()
    assert main([*evaluated, "--allow-overlap"]) == 0
    assert main(["plan", "--lc", lc_path, "--k", "2", "--data", data, "--out", str(tmp_path / "k.json")]) == 2
    assert "--policy shortv --k 2 measures none: drop --data" in capsys.readouterr().err
