"""Running a probe over a ``datasets.Dataset``: sample selection, prompts, batches, checkpoints, shards.

A probe is a function from one :class:`PromptedBatch` to an ``xarray.Dataset`` whose first dim is
``sample``. :func:`run_probe` selects the samples from a seed, cuts them into fixed batches (the
same batches whatever the number of processes, so results do not depend on it), gives each
process of an ``accelerate``/``torchrun`` launch every ``world``-th batch, gathers the results,
and, with a checkpoint directory, saves each finished batch so that an interrupted run resumes
where it stopped without losing or double-counting samples.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import datasets
import numpy as np
import torch
import transformers
import xarray as xr
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import PreTrainedModel, ProcessorMixin

from eemllm_models import build_prompt
from eemllm_models.apply import applied_plan, current_plan
from eemllm_models.generation import encode_prompts
from eemllm_models.families import family_of
from eemllm_models.files import atomic_write, atomic_write_text

POSITIONS = ("last_prompt", "answer")


@dataclass(frozen=True)
class PromptedBatch:
    """One batch of samples, encoded for the model.

    ``inputs``: the processor's output on the model's device (``input_ids`` ``[batch, seq]``,
    left-padded, pixel inputs in the model's dtype). ``positions`` ``[batch, n]`` are the positions
    whose next-token distributions a probe compares (``position_mask`` ``[batch, n]`` marks the real
    ones): the last prompt position, or every position that predicts an answer token.
    """

    rows: list[int]
    inputs: dict[str, torch.Tensor]
    positions: torch.Tensor
    position_mask: torch.Tensor


@dataclass(frozen=True)
class ProbeInputs:
    """Which samples of which data set a probe reads, and how each becomes a prompt.

    ``prompt_template``: ``None`` uses the processor's chat template; otherwise a string with the
    processor's image placeholder and ``{question}``, e.g. ``"USER: <image>\\n{question} ASSISTANT:"``.
    """

    dataset: datasets.Dataset
    samples: int | None = None
    seed: int = 0
    batch_size: int = 8
    positions: str = "last_prompt"
    prompt_template: str | None = None
    image_column: str = "image"
    question_column: str = "question"
    answer_column: str = "answer"
    label_column: str = "qtype"

    def rows(self) -> list[int]:
        """Dataset row indices in probe order: the first ``samples`` of a ``seed`` permutation."""
        n_rows = len(self.dataset)
        samples = n_rows if self.samples is None else self.samples
        if not 1 <= samples <= n_rows:
            raise ValueError(f"samples must be between 1 and the data set's {n_rows} rows, got {self.samples}")
        return np.random.default_rng(self.seed).permutation(n_rows)[:samples].tolist()

    def check(self, processor: ProcessorMixin) -> None:
        """Raise a clear error if the data set lacks a needed column or the template an image slot."""
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        needed = {"image_column": self.image_column, "question_column": self.question_column}
        if self.positions == "answer":
            needed["answer_column"] = self.answer_column
        for parameter, column in needed.items():
            if column not in self.dataset.column_names:
                raise ValueError(f"the data set has no column {column!r} (its columns: {self.dataset.column_names}); "
                                 f"name the right one with {parameter}=...")
        if self.prompt_template is not None:
            placeholder = getattr(processor, "image_token", "<image>")
            for part, example in ((placeholder, "where the image goes"), ("{question}", "where the question goes")):
                if part not in self.prompt_template:
                    raise ValueError(f"prompt template {self.prompt_template!r} has no {part!r}; put it {example}, "
                                     f"e.g. 'USER: {placeholder}\\n{{question}} ASSISTANT:'")

    def settings(self) -> dict[str, str | int]:
        """The attrs that identify this selection in a probe's result."""
        info = self.dataset.info
        return {
            "dataset": info.dataset_name or info.builder_name or "unnamed",
            "dataset_split": str(self.dataset.split or ""),
            "dataset_fingerprint": self.dataset._fingerprint,
            "samples": len(self.rows()),
            "seed": self.seed,
            "batch_size": self.batch_size,
            "positions": self.positions,
            "prompt_template": self.prompt_template or "chat template",
        }

    def prompt(self, processor: ProcessorMixin, question: str) -> str:
        if self.prompt_template is None:
            return build_prompt(processor, question)
        return self.prompt_template.replace("{question}", question)


def encode(model: PreTrainedModel, processor: ProcessorMixin, spec: ProbeInputs, rows: Sequence[int]) -> PromptedBatch:
    """Encode dataset ``rows`` as one left-padded batch with the positions the probe reads."""
    records = spec.dataset.select(rows)
    prompts = [spec.prompt(processor, q) for q in records[spec.question_column]]
    if spec.positions == "answer":
        answers = [str(a) for a in records[spec.answer_column]]
        texts = [f"{p} {a}" for p, a in zip(prompts, answers)]
        tokenize = processor.tokenizer
        n_answer = [len(tokenize(t)["input_ids"]) - len(tokenize(p)["input_ids"]) for t, p in zip(texts, prompts)]
    else:
        texts, n_answer = prompts, [1] * len(prompts)
    inputs = dict(encode_prompts(model, processor, records[spec.image_column], texts, "left"))
    width = inputs["input_ids"].shape[1]
    most = max(n_answer)
    slot = torch.arange(most)
    count = torch.tensor(n_answer)[:, None]
    # Left padding: the answer's k-th token sits at width - n + k and is predicted one position earlier.
    offset = 1 if spec.positions == "answer" else 0
    positions = (width - offset - count + slot).clamp(min=0)
    mask = slot < count
    return PromptedBatch(list(rows), inputs, positions.to(model.device), mask.to(model.device))


def model_attrs(model: PreTrainedModel) -> dict[str, str | int]:
    """The attrs that identify the model (and software) a probe result came from.

    ``plan``: the applied plan as JSON (``{"modes": [...], "provenance": {...}}``; the empty plan
    when none is applied), so a result says which model it measured: the original or a planned one.
    """
    handle = applied_plan(model)
    return {
        "model": str(getattr(model.config, "_name_or_path", "") or type(model).__name__),
        "model_class": type(model).__name__,
        "n_layers": len(family_of(model).decoder_layers(model)),
        "plan": json.dumps(current_plan(model).to_dict(), sort_keys=True),
        "plan_implementation": "none" if handle is None else handle.implementation,
        "dtype": str(model.dtype).removeprefix("torch."),
        "eemllm_version": version("eemllm"),
        "transformers_version": transformers.__version__,
        "torch_version": str(torch.__version__),
    }


class CheckpointMismatch(ValueError):
    """A checkpoint directory holds batches of a probe run with other settings."""


def _checkpoint_settings(checkpoint: Path, settings: dict) -> None:
    path = checkpoint / "settings.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        differ = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
        if differ:
            detail = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differ.items())
            raise CheckpointMismatch(f"checkpoint directory {checkpoint} belongs to a different probe run ({detail}); "
                                     "pass a new checkpoint directory, or delete this one to start over")
    else:
        atomic_write_text(path, json.dumps(settings, indent=1) + "\n")


def run_probe(
    name: str,
    model: PreTrainedModel,
    processor: ProcessorMixin,
    spec: ProbeInputs,
    probe_batch: Callable[[PromptedBatch], xr.Dataset],
    settings: dict[str, str | int | float],
    checkpoint: str | Path | None = None,
    progress: bool = True,
) -> xr.Dataset:
    """Run ``probe_batch`` over the selected samples and return the merged result.

    The result's ``sample`` coordinate holds the rows' ``id`` column (or the row index), with
    ``row`` (and the label column, if the data set has it) alongside; attrs record the model,
    the data, ``settings`` and the software versions.
    """
    spec.check(processor)
    rows = spec.rows()
    attrs = {"probe": name, **model_attrs(model), **spec.settings(), **settings}
    chunks = [rows[i : i + spec.batch_size] for i in range(0, len(rows), spec.batch_size)]
    state = PartialState()
    mine = list(range(state.process_index, len(chunks), state.num_processes))
    directory = None if checkpoint is None else Path(checkpoint)
    if directory is not None:
        identity = {k: v for k, v in attrs.items() if not k.endswith("_version")}
        if state.is_main_process:
            _checkpoint_settings(directory, identity)
        state.wait_for_everyone()
        if not state.is_main_process:
            _checkpoint_settings(directory, identity)
    if directory is not None:
        saved = [(directory / f"batch-{k:06d}.nc").is_file() for k in mine]
        if any(saved):
            print(f"probe {name}: all {len(mine)} batches already saved in {directory}" if all(saved) else
                  f"probe {name}: resuming at batch {saved.index(False) + 1} of {len(mine)} ({sum(saved)} saved in "
                  f"{directory})", file=sys.stderr)
    done: list[tuple[int, xr.Dataset]] = []
    for k in tqdm(mine, desc=f"probe {name}", unit="batch", disable=not progress or len(mine) < 2):
        path = None if directory is None else directory / f"batch-{k:06d}.nc"
        if path is not None and path.is_file():
            part = xr.load_dataset(path, engine="h5netcdf")
        else:
            with torch.no_grad():
                part = _label(probe_batch(encode(model, processor, spec, chunks[k])), spec, chunks[k])
            if path is not None:
                atomic_write(path, lambda tmp, part=part: part.to_netcdf(tmp, engine="h5netcdf"))
        done.append((k, part))
    if state.num_processes > 1:
        done = gather_object(done)
    result = xr.concat([part for _, part in sorted(done, key=lambda kv: kv[0])], dim="sample")
    result.attrs = {k: v for k, v in attrs.items() if v is not None}
    return result


def _label(part: xr.Dataset, spec: ProbeInputs, rows: list[int]) -> xr.Dataset:
    """Attach the sample coordinates (ids, row indices, labels) to one batch's result."""
    records = spec.dataset.select(rows)
    ids = records["id"] if "id" in records.column_names else [str(r) for r in rows]
    coords = {"sample": [str(i) for i in ids], "row": ("sample", np.asarray(rows, dtype=np.int64))}
    if spec.label_column in records.column_names:
        coords[spec.label_column] = ("sample", [str(v) for v in records[spec.label_column]])
    return part.assign_coords(coords)
