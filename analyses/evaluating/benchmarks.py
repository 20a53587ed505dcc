"""Benchmark data sets: the built-in shapes-vqa and loaders for the public sets the papers report.

Every loader returns a ``datasets.Dataset`` with the same columns (see :data:`COLUMNS`) and
``info.dataset_name`` set to the benchmark's name, which is how :func:`analyses.evaluating.evaluate.answer_frame`
picks the metric. Prompts follow LLaVA-1.5's evaluation (as lmms-eval's default prompts reproduce
it): options as ``"A. text"`` lines, then the instruction.

Public sets come from ``path`` (a local copy: the hub repository's folder as downloaded with
``hf download REPO --repo-type dataset``, or one parquet/jsonl/tsv file such as MMBench's official
TSV with base64 images) or, without ``path``, from ``datasets.load_dataset(hub_id)``, which reads
the user's Hugging Face cache (offline too, once cached). One image per question: multi-image rows
(SEED-Bench's video questions) are out of scope.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pandas as pd

from eemllm_models.zoo import shapes_vqa
from eemllm_models.zoo.shapes_vqa import MC_INSTRUCTION, load_shapes_vqa

SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
MME_YES_NO_SUFFIX = " Please answer yes or no."
LETTERS = "ABCDEFGHIJ"

COLUMNS = datasets.Features({
    "id": datasets.Value("string"),
    "image": datasets.Image(),
    "question": datasets.Value("string"),
    "answer": datasets.Value("string"),
    "qtype": datasets.Value("string"),
    "choices": datasets.List(datasets.Value("string")),
    "answers": datasets.List(datasets.Value("string")),
    "group": datasets.Value("string"),
})
"""The normalised columns: ``id``; ``image`` (PIL); ``question`` (the full prompt: hint, question,
lettered options, instruction); ``answer`` (a letter for multiple choice, ``yes``/``no``, or a short
answer); ``qtype`` (the set's category); ``choices`` (option texts, empty for open questions);
``answers`` (every reference answer, for VQA accuracy; else ``[answer]``); ``group`` (rows scored
together: the two questions of an MME image, MMBench's circular variants; else the row's id)."""

SEED_DIMENSIONS = {
    1: "Scene Understanding", 2: "Instance Identity", 3: "Instance Attributes", 4: "Instance Location",
    5: "Instances Counting", 6: "Spatial Relation", 7: "Instance Interaction", 8: "Visual Reasoning",
    9: "Text Understanding", 10: "Action Recognition", 11: "Action Prediction", 12: "Procedure Understanding",
}
"""SEED-Bench's ``question_type_id`` -> evaluation dimension (1-9 image, 10-12 video)."""


class BenchmarkNotFoundError(FileNotFoundError):
    """A benchmark is neither at the given path nor in the Hugging Face cache."""


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark lives, how its rows become :data:`COLUMNS`, and how it is scored.

    ``metric`` is one of ``exact_match``, ``vqa_accuracy``, ``choice`` (option letter, extracted
    from the prediction), ``yes_no`` (POPE) or ``mme`` (yes/no with MME's acc + acc+ score).
    ``fields`` are the source columns every row needs; ``row`` turns a source row (and its
    source index) into the text columns. ``group`` is ``(field, key)`` when rows are scored
    together (``key(row[field])`` names the group); ``only`` is ``(field, value)`` when just the
    rows holding ``value`` belong to the benchmark. ``data_dir`` is the folder of the config's
    parquet files in the hub repository; GQA's images come from a second config,
    ``image_config`` (folder ``image_dir``), joined on ``imageId``.
    """

    name: str
    title: str
    hub_id: str | None
    config: str | None
    split: str
    metric: str
    instruction: str
    fields: tuple[str, ...]
    row: Callable[[dict, int], dict] | None = None
    group: tuple[str, Callable[[object], str]] | None = None
    only: tuple[str, str] | None = None
    data_dir: str = "data"
    image_config: str | None = None
    image_dir: str | None = None
    max_new_tokens: int = 16

    def fetch_command(self, split: str) -> str:
        """The shell command that downloads this set's ``split`` files into ``./{title}``."""
        folders = [self.data_dir] + ([self.image_dir] if self.image_dir else [])
        include = " ".join(f'--include "{folder}/{split}-*"' for folder in folders)
        return f"hf download {self.hub_id} --repo-type dataset {include} --local-dir ./{self.title}"


def _present(value) -> bool:
    """Whether an optional source value holds something (not None, NaN, "" or the string "nan")."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return str(value).strip() not in ("", "nan", "None")


def _options(choices: list[str]) -> list[str]:
    return [f"{LETTERS[k]}. {choice}" for k, choice in enumerate(choices)]


def _mmbench(row: dict, index: int) -> dict:
    choices = []
    for letter in "ABCDE":
        if not _present(row.get(letter)):
            break
        choices.append(str(row[letter]).strip())
    hint = [str(row["hint"]).strip()] if _present(row.get("hint")) else []
    answer = str(row["answer"]).strip()
    question = "\n".join([*hint, row["question"].strip(), *_options(choices), MC_INSTRUCTION])
    return {"id": str(int(row["index"])), "question": question, "answer": answer, "qtype": str(row["category"]),
            "choices": choices, "answers": [answer]}


def _circular(index) -> str:
    """MMBench's CircularEval: variant ``index + k * 1e6`` asks question ``index`` with shifted options."""
    return str(int(index) % 1_000_000)


def _mme(row: dict, index: int) -> dict:
    question = row["question"].strip().replace(MME_YES_NO_SUFFIX, "")
    answer = row["answer"].strip().lower()
    return {"id": f"{row['question_id']}#{index}", "question": f"{question}\n{SHORT_ANSWER_INSTRUCTION}",
            "answer": answer, "qtype": str(row["category"]), "choices": [], "answers": [answer]}


def _pope(row: dict, index: int) -> dict:
    answer = row["answer"].strip().lower()
    qid = str(row["question_id"])
    return {"id": qid, "question": f"{row['question'].strip()}\n{SHORT_ANSWER_INSTRUCTION}", "answer": answer,
            "qtype": str(row["category"]), "choices": [], "answers": [answer]}


def _textvqa(row: dict, index: int) -> dict:
    answers = [str(a) for a in row["answers"]]
    if not answers:
        raise ValueError(f"TextVQA question {row['question_id']} has no reference answers")
    qid = str(row["question_id"])
    return {"id": qid, "question": f"{row['question'].strip()}\n{SHORT_ANSWER_INSTRUCTION}",
            "answer": Counter(answers).most_common(1)[0][0], "qtype": "all", "choices": [], "answers": answers}


def _gqa(row: dict, index: int) -> dict:
    types = row.get("types")
    qtype = types.get("structural") if isinstance(types, dict) and _present(types.get("structural")) else "all"
    answer = str(row["answer"]).strip()
    qid = str(row["id"])
    return {"id": qid, "question": f"{row['question'].strip()}\n{SHORT_ANSWER_INSTRUCTION}", "answer": answer,
            "qtype": qtype, "choices": [], "answers": [answer]}


def _scienceqa(row: dict, index: int) -> dict:
    choices = [str(c) for c in row["choices"]]
    answer = int(row["answer"])
    if not 0 <= answer < len(choices):
        raise ValueError(f"ScienceQA-IMG row {index}: answer index {answer} is outside its {len(choices)} choices")
    context = [f"Context: {str(row['hint']).strip()}"] if _present(row.get("hint")) else []
    subject = str(row["subject"]) if _present(row.get("subject")) else "all"
    question = "\n".join([*context, row["question"].strip(), *_options(choices), MC_INSTRUCTION])
    return {"id": str(index), "question": question, "answer": LETTERS[answer], "qtype": subject,
            "choices": choices, "answers": [LETTERS[answer]]}


def _seedbench(row: dict, index: int) -> dict:
    choices = [str(row[f"choice_{c}"]).strip() for c in "abcd"]
    answer = str(row["answer"]).strip()
    kind = row.get("question_type_id")
    qtype = SEED_DIMENSIONS.get(int(kind), str(kind)) if _present(kind) else "all"
    qid = str(row["question_id"])
    return {"id": qid, "question": "\n".join([row["question"].strip(), *_options(choices), MC_INSTRUCTION]),
            "answer": answer, "qtype": qtype, "choices": choices, "answers": [answer]}


BENCHMARKS: dict[str, BenchmarkSpec] = {spec.name: spec for spec in (
    BenchmarkSpec("shapes-vqa", "shapes-vqa", None, None, "test", "exact_match",
                  "as generated (MC_INSTRUCTION on its multiple-choice rows)", (), max_new_tokens=8),
    BenchmarkSpec("mmbench", "MMBench", "lmms-lab/MMBench", "en", "dev", "choice", MC_INSTRUCTION,
                  ("index", "question", "A", "B", "answer", "category", "image"), _mmbench,
                  group=("index", _circular), data_dir="en"),
    BenchmarkSpec("mme", "MME", "lmms-lab/MME", None, "test", "mme", SHORT_ANSWER_INSTRUCTION,
                  ("question_id", "question", "answer", "category", "image"), _mme, group=("question_id", str)),
    BenchmarkSpec("pope", "POPE", "lmms-lab/POPE", None, "test", "yes_no", SHORT_ANSWER_INSTRUCTION,
                  ("question_id", "question", "answer", "category", "image"), _pope),
    BenchmarkSpec("textvqa", "TextVQA", "lmms-lab/textvqa", None, "validation", "vqa_accuracy",
                  SHORT_ANSWER_INSTRUCTION, ("question_id", "question", "answers", "image"), _textvqa),
    BenchmarkSpec("gqa", "GQA", "lmms-lab/GQA", "testdev_balanced_instructions", "testdev", "exact_match",
                  SHORT_ANSWER_INSTRUCTION, ("id", "imageId", "question", "answer"), _gqa,
                  data_dir="testdev_balanced_instructions", image_config="testdev_balanced_images",
                  image_dir="testdev_balanced_images"),
    BenchmarkSpec("scienceqa-img", "ScienceQA-IMG", "lmms-lab/ScienceQA", "ScienceQA-IMG", "test", "choice",
                  MC_INSTRUCTION, ("question", "choices", "answer", "image"), _scienceqa, data_dir="ScienceQA-IMG"),
    BenchmarkSpec("seedbench", "SEED-Bench", "lmms-lab/SEED-Bench", None, "test", "choice", MC_INSTRUCTION,
                  ("question_id", "question", "choice_a", "choice_b", "choice_c", "choice_d", "answer", "image"),
                  _seedbench, only=("data_type", "image")),
)}
"""Registered benchmarks by name. Hub ids, configs, default splits and prompts are lmms-eval's."""


def benchmark_spec(dataset: datasets.Dataset) -> BenchmarkSpec | None:
    """The registered benchmark a data set comes from (its ``info.dataset_name``), or None."""
    return BENCHMARKS.get(dataset.info.dataset_name or "")


def load_benchmark(name: str, path: str | Path | None = None, split: str | None = None, n: int | None = None,
                   seed: int = 0) -> datasets.Dataset:
    """Load benchmark ``name`` (a :data:`BENCHMARKS` key) as a data set with the :data:`COLUMNS`.

    ``path``: a local copy (the hub repository's folder, the config's folder in it, or a single
    parquet/jsonl/json/tsv/csv file); without it, the hub id through the Hugging Face cache.
    ``split`` defaults to the set's evaluation split. ``n``: a seeded random choice of whole
    groups (an MME image's two questions stay together) with at least ``n`` rows, in source order.

    Raises ``BenchmarkNotFoundError`` saying where it looked and how to fetch the set when it is
    neither at ``path`` nor cached, and ``ValueError`` naming the field when the source lacks one.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}")
    spec = BENCHMARKS[name]
    split = split or spec.split
    if n is not None and n < 1:
        raise ValueError(f"n must be a positive number of rows, got {n}")
    if spec.hub_id is None:
        if path is not None:
            raise ValueError(f"{spec.title} is generated, not read from files; drop path={str(path)!r}")
        return _scored_columns(load_shapes_vqa(split, n=n, seed=seed))
    if path is None:
        raw, images = _from_hub(spec, split)
        where = f"the cached hub data set {spec.hub_id}"
    else:
        raw, images = _from_path(spec, Path(path).expanduser(), split)
        where = str(path)
    _require(spec, raw, spec.fields, where)
    if images is not None:
        _require(spec, images, ("id", "image"), f"{where} ({spec.image_config})")
    if spec.only and spec.only[0] in raw.column_names:
        field, value = spec.only
        raw = raw.filter(lambda v: v == value, input_columns=field, desc=f"{spec.title} rows with {field} {value}")
    rows = _sample(spec, raw, n, seed)
    table = _normalise(spec, raw.select(rows), rows, images)
    info = datasets.DatasetInfo(dataset_name=name, features=table.features,
                                description=f"{spec.title} {split} split from {where}"
                                            + (f", {len(rows)} rows sampled with seed {seed}" if n else ""))
    return datasets.Dataset(table.data, info=info, split=split)


def _require(spec: BenchmarkSpec, table: datasets.Dataset, fields: tuple[str, ...], where: str) -> None:
    missing = [field for field in fields if field not in table.column_names]
    if missing:
        raise ValueError(f"{spec.title} data from {where} has no field {missing[0]!r} (needs {list(fields)}); "
                         f"its columns: {table.column_names}. Is this the {spec.title} {spec.hub_id} layout?")


def _not_found(spec: BenchmarkSpec, split: str, looked: str) -> BenchmarkNotFoundError:
    return BenchmarkNotFoundError(
        f"{spec.title} ({spec.hub_id}, split {split!r}) is not available: {looked}.\n"
        f"Fetch it on a machine with network:\n    {spec.fetch_command(split)}\n"
        f"then pass path=\"./{spec.title}\" (CLI: --data ./{spec.title}); or run "
        f"datasets.load_dataset({spec.hub_id!r}{', ' + repr(spec.config) if spec.config else ''}, split={split!r}) "
        f"once online to fill the Hugging Face cache.")


def _from_hub(spec: BenchmarkSpec, split: str) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    import huggingface_hub

    def load(config: str | None) -> datasets.Dataset:
        try:
            return datasets.load_dataset(spec.hub_id, config, split=split)
        except Exception as err:  # datasets raises ConnectionError, FileNotFoundError, ValueError... here
            looked = (f"no path= was given and the Hugging Face cache has no copy "
                      f"(HF_DATASETS_CACHE={datasets.config.HF_DATASETS_CACHE}, "
                      f"HF_HUB_CACHE={huggingface_hub.constants.HF_HUB_CACHE}; "
                      f"datasets.load_dataset said {type(err).__name__}: {err})")
            raise _not_found(spec, split, looked) from err

    return load(spec.config), load(spec.image_config) if spec.image_config else None


def _from_path(spec: BenchmarkSpec, path: Path, split: str) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    if not path.exists():
        raise _not_found(spec, split, f"{path} does not exist")
    if path.is_file():
        if spec.image_config:
            raise ValueError(f"{spec.title} keeps questions and images in two configs; pass the folder "
                             f"holding {spec.data_dir}/ and {spec.image_dir}/, not the file {path}")
        return _read([path]), None
    questions = _split_files(spec, path, spec.data_dir, split)
    images = _split_files(spec, path, spec.image_dir, split) if spec.image_dir else None
    return _read(questions), _read(images) if images else None


def _split_files(spec: BenchmarkSpec, root: Path, folder: str, split: str) -> list[Path]:
    """The ``split`` parquet files of ``folder`` under ``root`` (the repository or the folder itself)."""
    # the repository's folder; then, for a set in one config, the folder passed itself, or, for
    # GQA's two configs, the sibling of the config folder passed
    for candidate in (root / folder, root.parent / folder if spec.image_dir else root):
        files = sorted(candidate.glob(f"{split}-*.parquet")) or sorted(candidate.glob(f"{split}.parquet"))
        if files:
            return files
    found = sorted(str(p.relative_to(root)) for p in root.rglob("*.parquet"))[:10]
    raise _not_found(spec, split, f"{root} has no {folder}/{split}-*.parquet (the hub repository's layout); "
                                  f"parquet files there: {found or 'none'}")


def _read(files: list[Path]) -> datasets.Dataset:
    """One data set from local files of one kind (parquet, jsonl/json, or tsv/csv)."""
    suffix = files[0].suffix.lower()
    if suffix == ".parquet":
        return datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    if suffix in (".jsonl", ".json"):
        return datasets.load_dataset("json", data_files=[str(f) for f in files], split="train")
    if suffix in (".tsv", ".csv"):
        frame = pd.concat([pd.read_csv(f, sep="\t" if suffix == ".tsv" else ",", keep_default_na=False,
                                       dtype=str) for f in files], ignore_index=True)
        return datasets.Dataset.from_pandas(_resolve_image_references(frame), preserve_index=False)
    raise ValueError(f"cannot read {files[0]}: expected .parquet, .jsonl, .json, .tsv or .csv")


def _resolve_image_references(frame: pd.DataFrame) -> pd.DataFrame:
    """MMBench's TSVs store a repeated image once; other rows hold that row's ``index`` instead."""
    if "image" not in frame.columns or "index" not in frame.columns:
        return frame
    by_index = dict(zip(frame["index"], frame["image"]))
    frame = frame.copy()
    frame["image"] = [by_index.get(v, v) if len(v) < 64 and v.isdigit() else v for v in frame["image"]]
    return frame


def _group_of(spec: BenchmarkSpec, table: datasets.Dataset) -> list[str]:
    """The scoring group of every source row (cheap: reads one column), or the row number."""
    if spec.group is None:
        return [str(i) for i in range(len(table))]
    field, key = spec.group
    return [key(v) for v in table[field]]


def _sample(spec: BenchmarkSpec, table: datasets.Dataset, n: int | None, seed: int) -> list[int]:
    """Source rows to keep: all, or whole groups in seeded random order until there are ``n`` rows."""
    if n is None or n >= len(table):
        return list(range(len(table)))
    members: dict[str, list[int]] = {}
    for row, group in enumerate(_group_of(spec, table)):
        members.setdefault(group, []).append(row)
    groups = list(members.values())
    chosen: list[int] = []
    for k in np.random.default_rng(seed).permutation(len(groups)):
        if len(chosen) >= n:
            break
        chosen += groups[k]
    return sorted(chosen)


def _image_struct(value, where: str) -> dict:
    """An image value as stored anywhere (struct, bytes, base64 text, file path, one-item list) as
    the ``{"bytes", "path"}`` struct of ``datasets.Image``, without decoding it."""
    if isinstance(value, list):
        if len(value) != 1:
            raise ValueError(f"{where} has {len(value)} images; multi-image rows (such as SEED-Bench's video "
                             f"questions) are out of scope: one image per question")
        value = value[0]
    if isinstance(value, dict) and value.get("bytes") is not None:
        return {"bytes": value["bytes"], "path": value.get("path")}
    if isinstance(value, dict) and _is_file(value.get("path")):
        return {"bytes": Path(value["path"]).read_bytes(), "path": value["path"]}
    if isinstance(value, bytes):
        return {"bytes": value, "path": None}
    if isinstance(value, str) and value:
        if _is_file(value):
            return {"bytes": Path(value).read_bytes(), "path": value}
        try:
            return {"bytes": base64.b64decode(value, validate=True), "path": None}
        except (binascii.Error, ValueError):
            pass
    raise ValueError(f"{where} has no readable image (got {type(value).__name__}: {str(value)[:60]!r}); "
                     f"expected image bytes, a {{'bytes', 'path'}} struct, base64 text or a file path")


def _is_file(text) -> bool:
    try:
        return isinstance(text, str) and len(text) < 4096 and Path(text).is_file()
    except OSError:  # a long base64 text is no file name
        return False


def _undecoded(table: datasets.Dataset) -> datasets.Dataset:
    """``table`` with its image column, if typed, left as undecoded ``{"bytes", "path"}`` structs."""
    feature = table.features.get("image")
    if isinstance(feature, datasets.Image):
        return table.cast_column("image", datasets.Image(decode=False))
    if isinstance(feature, datasets.List) and isinstance(feature.feature, datasets.Image):
        return table.cast_column("image", datasets.List(datasets.Image(decode=False)))
    return table


def _normalise(spec: BenchmarkSpec, table: datasets.Dataset, rows: list[int],
               images: datasets.Dataset | None) -> datasets.Dataset:
    """Source rows -> :data:`COLUMNS` rows (GQA's image joined from ``images`` by ``imageId``)."""
    table = _undecoded(table)
    if images is not None:
        images = _undecoded(images)
        image_row = {str(i): k for k, i in enumerate(images["id"])}

    def normalise(row: dict, k: int) -> dict:
        out = spec.row(row, rows[k])
        out["group"] = spec.group[1](row[spec.group[0]]) if spec.group else out["id"]
        where = f"{spec.title} row {out['id']}"
        if images is None:
            if row["image"] is None:
                raise ValueError(f"{where} has no image; eemllm benchmarks ask about one image per question")
            value = row["image"]
        else:
            key = str(row["imageId"])
            if key not in image_row:
                raise ValueError(f"{where}: image {key!r} is not in {spec.image_config}")
            value = images[image_row[key]]["image"]
        return {**out, "image": _image_struct(value, where)}

    return table.map(normalise, with_indices=True, remove_columns=table.column_names, features=COLUMNS,
                     desc=f"normalising {spec.title}")


def _scored_columns(data: datasets.Dataset) -> datasets.Dataset:
    """shapes-vqa rows with the :data:`COLUMNS` they lack: ``answers`` (``[answer]``) and ``group`` (the id)."""
    return data.add_column("answers", [[a] for a in data["answer"]]).add_column("group", data["id"])


# ----------------------------------------------------------------------------- reading one range at a time

class RowRanges:
    """A data set of ``len(self)`` rows that is read one range of rows at a time.

    ``read(start, stop)`` returns rows ``start .. stop - 1`` as a ``datasets.Dataset`` (images
    decoded, or generated, only then). Only the last range read is kept (so reading two columns
    of one range builds it once), so a pass over the rows holds one range, whatever their number:
    this is how ``eemllm latency``/``evaluate`` stream 100,000 samples in flat memory.
    """

    def __init__(self, n_rows: int, read: Callable[[int, int], datasets.Dataset]) -> None:
        if n_rows < 0:
            raise ValueError(f"n_rows must be non-negative, got {n_rows}")
        self.n_rows = n_rows
        self._read = read
        self._last: tuple[int, int, datasets.Dataset] | None = None
        self._head: datasets.Dataset | None = None

    @classmethod
    def of(cls, dataset: datasets.Dataset) -> RowRanges:
        """The rows of an existing (memory-mapped or in-memory) data set, selected one range at a time."""
        return cls(len(dataset), lambda start, stop: dataset.select(range(start, stop)))

    def __len__(self) -> int:
        return self.n_rows

    def rows(self, start: int, stop: int) -> datasets.Dataset:
        """Rows ``start .. stop - 1`` (clipped to the data set)."""
        start, stop = max(0, start), min(stop, self.n_rows)
        stop = max(start, stop)
        if self._last is None or self._last[:2] != (start, stop):
            self._last = (start, stop, self._read(start, stop))
        return self._last[2]

    @property
    def head(self) -> datasets.Dataset:
        """No rows, with the data set's columns, features and ``info``."""
        if self._head is None:
            self._head = self._read(0, 0)
        return self._head

    @property
    def column_names(self) -> list[str]:
        return self.head.column_names

    @property
    def info(self) -> datasets.DatasetInfo:
        return self.head.info

    def ranges(self, size: int) -> Iterator[tuple[int, datasets.Dataset]]:
        """``(start, rows)`` for consecutive ranges of ``size`` rows (the last one shorter)."""
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        for start in range(0, self.n_rows, size):
            yield start, self.rows(start, start + size)

    def column(self, name: str) -> Sequence:
        """Column ``name`` as a lazy sequence: indexing or slicing it reads only the rows asked for."""
        if name not in self.column_names:
            raise ValueError(f"the data set has no column {name!r} (its columns: {self.column_names})")
        return _LazyColumn(self, name)


class _LazyColumn(Sequence):
    def __init__(self, rows: RowRanges, name: str) -> None:
        self._rows, self._name = rows, name

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self._rows))
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            return list(self._rows.rows(start, stop)[self._name])
        if index < 0:
            index += len(self._rows)
        if not 0 <= index < len(self._rows):
            raise IndexError(index)
        return self._rows.rows(index, index + 1)[self._name][0]


def shapes_vqa_ranges(split: str = "test", n: int | None = None, seed: int = 0,
                      scored: bool = False) -> RowRanges:
    """``load_shapes_vqa(split, n, seed)``, generated one range of rows at a time (row for row the same).

    ``scored``: with the ``answers`` and ``group`` columns that :func:`load_benchmark` adds.
    """
    size = shapes_vqa.DEFAULT_SIZES.get(split) if n is None else n
    load_shapes_vqa(split, n=0, seed=seed)  # validates the split before any work
    if size is None or size < 0:
        raise ValueError(f"n must be a non-negative number of rows, got {n!r}")

    def read(start: int, stop: int) -> datasets.Dataset:
        data = load_shapes_vqa(split, n=stop - start, seed=seed, start=start)
        return _scored_columns(data) if scored else data

    return RowRanges(size, read)


def benchmark_ranges(name: str, path: str | Path | None = None, split: str | None = None, n: int | None = None,
                     seed: int = 0) -> RowRanges:
    """:func:`load_benchmark`'s rows, read one range at a time: shapes-vqa is generated per range;
    a public set is loaded (memory-mapped from its files) and selected per range."""
    if name == "shapes-vqa" and path is None:
        if n is not None and n < 1:
            raise ValueError(f"n must be a positive number of rows, got {n}")
        return shapes_vqa_ranges(split or BENCHMARKS[name].split, n=n, seed=seed, scored=True)
    return RowRanges.of(load_benchmark(name, path=path, split=split, n=n, seed=seed))


# ----------------------------------------------------------------------------- the user's own data

LOCAL_FORMATS = "a datasets save_to_disk folder, a .parquet file, a .jsonl/.json file, or a .csv/.tsv file"


def load_local_dataset(path: str | Path, image_column: str = "image", split: str | None = None) -> datasets.Dataset:
    """A user's data set from local files, with ``image_column`` decoding to PIL images.

    ``path``: a folder written by ``datasets.Dataset.save_to_disk`` (of a ``DatasetDict``: its
    ``split``, needed when it holds several), or one ``.parquet``, ``.jsonl``/``.json`` or ``.csv``/``.tsv`` file (or a folder
    of parquet files). Images may be stored as image bytes, ``{"bytes", "path"}`` structs, base64
    text or file paths (a relative path is read from the data file's folder). The rows are
    memory-mapped from disk (``datasets``' cache for files), not held in memory.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no data at {path}; give {LOCAL_FORMATS}")
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                if split in data:
                    data = data[split]
                elif len(data) == 1:
                    data = next(iter(data.values()))
                else:
                    raise ValueError(f"{path} holds the splits {sorted(data)}; choose one (split=..., CLI --split)")
        else:
            files = sorted(path.glob("*.parquet"))
            if not files:
                raise ValueError(f"{path} is a folder but neither a save_to_disk folder (no dataset_info.json) "
                                 f"nor a folder of .parquet files; give {LOCAL_FORMATS}")
            data = _read(files)
        base = path
    else:
        if path.suffix.lower() not in (".parquet", ".jsonl", ".json", ".csv", ".tsv"):
            raise ValueError(f"cannot read {path}: give {LOCAL_FORMATS}")
        data = _read([path])
        base = path.parent
    if image_column not in data.column_names or isinstance(data.features[image_column], datasets.Image):
        return data
    feature = data.features[image_column]
    if isinstance(feature, datasets.List) and isinstance(feature.feature, datasets.Image):
        return data

    def struct(value, k: int) -> dict:
        if isinstance(value, str) and not Path(value).is_absolute() and _is_file(str(base / value)):
            value = str(base / value)
        elif isinstance(value, dict) and isinstance(value.get("path"), str) and value.get("bytes") is None \
                and not Path(value["path"]).is_absolute():
            value = {**value, "path": str(base / value["path"])}
        return {image_column: _image_struct(value, f"{path} row {k} ({image_column!r})")}

    features = datasets.Features({**data.features, image_column: datasets.Image()})
    return data.map(struct, input_columns=image_column, with_indices=True, features=features,
                    desc=f"reading the images of {path.name}")
