"""Benchmark loaders on small synthetic files in each public set's real layout, and their metrics.

Each writer below builds 2-6 rows the way the hub repository (or the official TSV) stores them:
parquet files at ``<config folder>/<split>-0000x-of-0000n.parquet`` with images as
``{"bytes", "path"}`` structs, MMBench's TSV with base64 images.
"""

import base64
import io

import datasets
import huggingface_hub
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from analyses.evaluating.benchmarks import BENCHMARKS, COLUMNS, BenchmarkNotFoundError, load_benchmark
from analyses.evaluating.evaluate import (
    answer_frame,
    extract_choice,
    normalize_vqa_answer,
    parse_yes_no,
    prediction_frame,
    scores,
    vqa_accuracy,
)
from eemllm_models.zoo.shapes_vqa import MC_INSTRUCTION

SHORT = "Answer the question using a single word or phrase."
RED, GREEN, BLUE = (220, 40, 40), (40, 170, 60), (40, 80, 220)


@pytest.fixture(autouse=True)
def _no_real_cache(tmp_path, monkeypatch):
    """Keep every test off the network and out of the user's Hugging Face caches."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))


def _png(color, size=(24, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _image(color, name="img.png") -> dict:
    return {"bytes": _png(color), "path": name}


def _parquet(path, rows: list[dict]) -> None:
    """Write ``rows`` as the hub's parquet: image columns as structs of bytes and path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _color(image: Image.Image) -> tuple:
    return image.convert("RGB").getpixel((0, 0))


# ---------------------------------------------------------------- writers, one per public set

def _mmbench_tsv(tmp_path):
    """MMBench's official TSV: base64 images; a circular variant (index + 1e6) refers to its
    original row's image by index."""
    b64 = base64.b64encode(_png(RED)).decode()
    rows = [
        {"index": 0, "question": "What colour is the square?", "hint": "A square is drawn.", "A": "red",
         "B": "green", "C": "blue", "D": "black", "answer": "A", "category": "attribute_recognition",
         "image": b64, "source": "synthetic", "l2-category": "finegrained_perception", "comment": "", "split": "dev"},
        {"index": 1, "question": "Is this a photo?", "hint": "nan", "A": "yes", "B": "no", "C": "", "D": "",
         "answer": "B", "category": "image_style", "image": base64.b64encode(_png(BLUE)).decode(),
         "source": "synthetic", "l2-category": "coarse_perception", "comment": "", "split": "dev"},
        {"index": 1000000, "question": "What colour is the square?", "hint": "A square is drawn.", "A": "green",
         "B": "blue", "C": "black", "D": "red", "answer": "D", "category": "attribute_recognition",
         "image": "0", "source": "synthetic", "l2-category": "finegrained_perception", "comment": "", "split": "dev"},
    ]
    path = tmp_path / "mmbench_dev_en.tsv"
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def _mme_repo(tmp_path):
    rows = [
        {"question_id": "existence/000.png", "question": "Is there a red square in the image? Please answer yes or no.",
         "answer": "Yes", "category": "existence", "image": _image(RED, "000.png")},
        {"question_id": "existence/000.png",
         "question": "Is there a blue square in the image? Please answer yes or no.",
         "answer": "No", "category": "existence", "image": _image(RED, "000.png")},
        {"question_id": "code_reasoning/001.png", "question": "Does the code print 3? Please answer yes or no.",
         "answer": "Yes", "category": "code_reasoning", "image": _image(GREEN, "001.png")},
        {"question_id": "code_reasoning/001.png", "question": "Does the code print 4? Please answer yes or no.",
         "answer": "No", "category": "code_reasoning", "image": _image(GREEN, "001.png")},
    ]
    _parquet(tmp_path / "MME" / "data" / "test-00000-of-00001-0a1b2c3d.parquet", rows)
    return tmp_path / "MME"


def _pope_rows():
    return [
        {"id": str(i), "question_id": str(i + 1), "question": f"Is there a {thing} in the image?", "answer": answer,
         "image_source": f"COCO_val2014_{i:012d}", "image": _image(color, f"{i}.jpg"), "category": category}
        for i, (thing, answer, color, category) in enumerate([
            ("dog", "yes", RED, "adversarial"), ("cat", "no", RED, "adversarial"),
            ("car", "yes", GREEN, "popular"), ("bus", "no", BLUE, "random")])
    ]


def _pope_repo(tmp_path, rows=None):
    rows = rows or _pope_rows()
    _parquet(tmp_path / "POPE" / "data" / "test-00000-of-00002.parquet", rows[:2])
    _parquet(tmp_path / "POPE" / "data" / "test-00001-of-00002.parquet", rows[2:])
    _parquet(tmp_path / "POPE" / "Full" / "adversarial-00000-of-00001.parquet", rows[:1])  # another config
    return tmp_path / "POPE"


def _textvqa_repo(tmp_path):
    common = {"image_width": 24, "image_height": 24, "flickr_original_url": "", "flickr_300k_url": "",
              "image_classes": ["Poster"], "set_name": "val", "ocr_tokens": ["nike"]}
    rows = [
        {"image_id": "a1", "question_id": 34602, "question": "what brand is on the shirt?",
         "question_tokens": ["what", "brand"], "image": _image(RED), "answers": ["nike"] * 2 + ["adidas"] * 8,
         **common},
        {"image_id": "a2", "question_id": 34603, "question": "how many people are there?",
         "question_tokens": ["how", "many"], "image": _image(GREEN), "answers": ["2"] * 3 + ["two people"] * 7,
         **common},
    ]
    _parquet(tmp_path / "textvqa" / "data" / "validation-00000-of-00001.parquet", rows)
    return tmp_path / "textvqa"


def _gqa_repo(tmp_path):
    def question(qid, image_id, text, answer, structural):
        return {"id": qid, "imageId": image_id, "question": text, "answer": answer, "fullAnswer": f"It is {answer}.",
                "isBalanced": True, "groups": {"global": None, "local": "10c-color"}, "entailed": [],
                "equivalent": [qid],
                "types": {"structural": structural, "semantic": "attr", "detailed": "color"},
                "annotations": {"answer": [], "fullAnswer": [], "question": []},
                "semantic": [{"operation": "select", "argument": "square", "dependencies": []}],
                "semanticStr": "select: square"}

    _parquet(tmp_path / "GQA" / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet", [
        question("20968379", "n161313", "What color is the square?", "red", "query"),
        question("20968380", "n161314", "Is the square green?", "yes", "verify"),
        question("20968381", "n161313", "Is it red or blue?", "red", "choose"),
    ])
    _parquet(tmp_path / "GQA" / "testdev_balanced_images" / "testdev-00000-of-00001.parquet", [
        {"id": "n161313", "image": _image(RED, "n161313.jpg")},
        {"id": "n161314", "image": _image(GREEN, "n161314.jpg")},
    ])
    return tmp_path / "GQA"


def _scienceqa_repo(tmp_path):
    common = {"task": "closed choice", "grade": "grade4", "topic": "geography", "category": "Geography",
              "skill": "Read a map", "lecture": "", "solution": ""}
    rows = [
        {"image": _image(BLUE), "question": "Which ocean is highlighted?", "choices": ["Pacific", "Indian", "Atlantic"],
         "answer": 2, "hint": "", "subject": "social science", **common},
        {"image": _image(GREEN), "question": "Which is a leaf?", "choices": ["rock", "leaf"], "answer": 1,
         "hint": "Look at the picture.", "subject": "natural science", **common},
    ]
    _parquet(tmp_path / "ScienceQA" / "ScienceQA-IMG" / "test-00000-of-00001.parquet", rows)
    return tmp_path / "ScienceQA"


def _seed_repo(tmp_path, frames_of_image_rows=1):
    def row(qid, kind, frames, type_id, answer):
        return {"answer": answer, "choice_a": "one", "choice_b": "two", "choice_c": "three", "choice_d": "four",
                "data_id": f"{qid}.jpg", "data_type": kind, "question": "How many squares are there?",
                "question_id": qid, "question_type_id": type_id, "segment": None,
                "image": [_image(RED, f"{qid}-{k}.jpg") for k in range(frames)]}

    _parquet(tmp_path / "SEED-Bench" / "data" / "test-00000-of-00001.parquet", [
        row("101669", "image", frames_of_image_rows, 5, "B"), row("101670", "image", 1, 1, "A"),
        row("v2001", "video", 8, 10, "C"),
    ])
    return tmp_path / "SEED-Bench"


# ---------------------------------------------------------------- loaders

def _check_columns(data: datasets.Dataset, name: str) -> None:
    assert set(data.column_names) == set(COLUMNS) and data.info.dataset_name == name
    assert all(isinstance(image, Image.Image) for image in data["image"])


def test_mmbench_tsv_with_base64_images_and_circular_variants(tmp_path):
    data = load_benchmark("mmbench", path=_mmbench_tsv(tmp_path))
    _check_columns(data, "mmbench")
    assert data["id"] == ["0", "1", "1000000"] and data["group"] == ["0", "1", "0"]
    assert data[0]["question"] == ("A square is drawn.\nWhat colour is the square?\nA. red\nB. green\nC. blue\n"
                                   f"D. black\n{MC_INSTRUCTION}")
    assert data[1]["question"] == f"Is this a photo?\nA. yes\nB. no\n{MC_INSTRUCTION}"
    assert data[1]["choices"] == ["yes", "no"]
    assert data["answer"] == ["A", "B", "D"] and data["qtype"][0] == "attribute_recognition"
    assert _color(data[2]["image"]) == RED  # the variant's image is its original's
    frame = prediction_frame(data, ["A", "The answer is B.", "(A) green"])
    assert frame.correct.tolist() == [True, True, False]
    assert scores(frame)["group_accuracy"] == 0.5  # question 0 fails its circular variant


def test_mme_prompt_pairs_and_score(tmp_path):
    data = load_benchmark("mme", path=_mme_repo(tmp_path))
    _check_columns(data, "mme")
    assert data[0]["question"] == f"Is there a red square in the image?\n{SHORT}"
    assert data["answer"] == ["yes", "no", "yes", "no"] and data["group"][:2] == ["existence/000.png"] * 2
    frame = prediction_frame(data, ["Yes", "Yes, there is.", "yes", "No."])
    result = scores(frame)
    # existence: 1 of 2 right -> acc 50, acc+ 0; code_reasoning: both right -> 100 + 100
    assert result["mme/existence"] == 50 and result["mme/code_reasoning"] == 200
    assert result["mme_perception"] == 50 and result["mme_cognition"] == 200 and result["group_accuracy"] == 0.5
    assert len(load_benchmark("mme", path=_mme_repo(tmp_path), n=1, seed=3)) == 2  # an image's pair stays whole


def test_pope_reads_the_default_config_and_scores_precision_recall_f1(tmp_path):
    data = load_benchmark("pope", path=_pope_repo(tmp_path))
    _check_columns(data, "pope")
    assert len(data) == 4 and data["id"] == ["1", "2", "3", "4"]  # not the Full/ config's copy
    assert data["qtype"] == ["adversarial", "adversarial", "popular", "random"]
    assert data[0]["question"] == f"Is there a dog in the image?\n{SHORT}" and _color(data[3]["image"]) == BLUE
    result = scores(prediction_frame(data, ["Yes", "yes", "No, there is not.", "no"]))
    assert result["overall"] == 0.5 and result["yes_no_precision"] == 0.5 and result["yes_no_recall"] == 0.5
    assert result["yes_no_f1"] == 0.5 and result["yes_ratio"] == 0.5 and "group_accuracy" not in result


def test_textvqa_keeps_every_annotator_answer(tmp_path):
    data = load_benchmark("textvqa", path=_textvqa_repo(tmp_path))
    _check_columns(data, "textvqa")
    assert data[0]["answer"] == "adidas" and len(data[0]["answers"]) == 10
    assert data[0]["question"] == f"what brand is on the shirt?\n{SHORT}"
    frame = prediction_frame(data, ["Nike", "two"])
    assert frame.score.round(3).tolist() == [0.667, 1.0]  # 2 of 10 annotators -> 2/3; "two" is "2" for 3 of them
    assert scores(frame)["overall"] == pytest.approx(5 / 6)


def test_gqa_joins_its_image_config_on_image_id(tmp_path):
    data = load_benchmark("gqa", path=_gqa_repo(tmp_path))
    _check_columns(data, "gqa")
    assert [_color(image) for image in data["image"]] == [RED, GREEN, RED]
    assert data["qtype"] == ["query", "verify", "choose"] and data[1]["question"] == f"Is the square green?\n{SHORT}"
    assert prediction_frame(data, ["Red.", "no", "blue"]).correct.tolist() == [True, False, False]
    instructions = _gqa_repo(tmp_path) / "testdev_balanced_instructions"
    assert len(load_benchmark("gqa", path=instructions)) == 3  # the config folder finds its sibling images


def test_scienceqa_img_letters_and_context(tmp_path):
    data = load_benchmark("scienceqa-img", path=_scienceqa_repo(tmp_path))
    _check_columns(data, "scienceqa-img")
    assert data["answer"] == ["C", "B"] and data["qtype"] == ["social science", "natural science"]
    assert data[0]["question"] == f"Which ocean is highlighted?\nA. Pacific\nB. Indian\nC. Atlantic\n{MC_INSTRUCTION}"
    assert data[1]["question"].startswith("Context: Look at the picture.\nWhich is a leaf?\nA. rock\nB. leaf\n")
    assert prediction_frame(data, ["Atlantic", "A"]).correct.tolist() == [True, False]


def test_seedbench_keeps_image_questions_and_refuses_multi_image_rows(tmp_path):
    data = load_benchmark("seedbench", path=_seed_repo(tmp_path))
    _check_columns(data, "seedbench")
    assert data["id"] == ["101669", "101670"]  # the video question is left out
    assert data["qtype"] == ["Instances Counting", "Scene Understanding"]
    assert data[0]["question"] == f"How many squares are there?\nA. one\nB. two\nC. three\nD. four\n{MC_INSTRUCTION}"
    assert prediction_frame(data, ["B", "C. three"]).correct.tolist() == [True, False]
    with pytest.raises(ValueError, match="row 101669 has 2 images; multi-image rows .* out of scope"):
        load_benchmark("seedbench", path=_seed_repo(tmp_path / "two", frames_of_image_rows=2))


def test_shapes_vqa_is_built_in():
    data = load_benchmark("shapes-vqa", n=3, seed=1)
    _check_columns(data, "shapes-vqa")
    assert data["answers"] == [[a] for a in data["answer"]] and data["group"] == data["id"]


# ---------------------------------------------------------------- bad input

def test_a_set_missing_a_field_names_it_and_the_columns_found(tmp_path):
    rows = [{k: v for k, v in row.items() if k != "answer"} for row in _pope_rows()]
    expected = r"POPE data from .* has no field 'answer'.*its columns: \['id', 'question_id'"
    with pytest.raises(ValueError, match=expected):
        load_benchmark("pope", path=_pope_repo(tmp_path, rows))


def test_nothing_found_says_where_it_looked_and_how_to_fetch(tmp_path):
    with pytest.raises(BenchmarkNotFoundError) as raised:
        load_benchmark("mme")
    message = str(raised.value)
    assert "MME (lmms-lab/MME, split 'test') is not available" in message
    assert f"HF_DATASETS_CACHE={tmp_path / 'hf' / 'datasets'}" in message
    assert 'hf download lmms-lab/MME --repo-type dataset --include "data/test-*" --local-dir ./MME' in message
    with pytest.raises(BenchmarkNotFoundError, match="has no ScienceQA-IMG/test-\\*.parquet"):
        load_benchmark("scienceqa-img", path=_pope_repo(tmp_path))
    with pytest.raises(BenchmarkNotFoundError, match="does not exist"):
        load_benchmark("gqa", path=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown benchmark 'mmmu'"):
        load_benchmark("mmmu")


def test_every_registered_set_has_a_fetch_command():
    for spec in BENCHMARKS.values():
        if spec.hub_id:
            assert spec.fetch_command(spec.split).startswith(f"hf download {spec.hub_id} --repo-type dataset")


# ---------------------------------------------------------------- metrics

def test_metric_helpers():
    assert normalize_vqa_answer("The Two dogs!") == "2 dogs" and normalize_vqa_answer("dont") == "don't"
    assert normalize_vqa_answer("3.5") == "3.5" and normalize_vqa_answer("yes.") == "yes"
    assert vqa_accuracy("a cat", ["cat", "cat", "dog"]) == pytest.approx(2 / 3)
    assert vqa_accuracy("cat", ["cat"] * 4) == 1.0
    choices = ["red circle", "blue square", "green cross"]
    assert [extract_choice(p, choices) for p in ("B", "(C)", "A. red circle", "The answer is C.",
                                                 "A blue square", "I don't know")] == ["B", "C", "A", "C", "B", None]
    assert [parse_yes_no(p) for p in ("Yes.", "No, it is not", "There is no dog", "maybe")] == ["yes", "no", "no",
                                                                                                 "other"]


def test_answer_frame_runs_the_default_model_on_a_public_set(tmp_path, default_model):
    model, processor = default_model
    data = load_benchmark("pope", path=_pope_repo(tmp_path), n=3)
    frame = answer_frame(model, processor, data, batch_size=2, progress=False)
    assert list(frame.columns) == ["id", "qtype", "question", "answer", "prediction", "score", "correct", "group"]
    assert len(frame) == 3 and frame.attrs == {"benchmark": "pope", "metric": "yes_no"}
    assert frame.prediction.map(type).eq(str).all() and frame.score.between(0, 1).all()
    assert {"overall", "yes_no_f1"} <= set(scores(frame))
