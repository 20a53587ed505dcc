"""Prefill time, decode speed and peak memory of a model with and without plans, measured side by side.

What is timed, for every variant (the original model, or the model with a plan applied):

* **prefill**: the first step of ``generate()``: one forward over the whole prompt (vision
  tower and projector included) that fills a fresh ``DynamicCache`` and returns the logits of
  the last position only (``logits_to_keep=1``). Inputs go through the model's own
  ``prepare_inputs_for_generation`` and carry ``generate()``'s position ids (from the padding mask).
* **decode**: the ``new_tokens - 1`` further greedy steps with that cache, each one forward of
  one token per sequence, plus the argmax and the mask / position bookkeeping that ``generate()``
  does between steps. End-of-sequence is suppressed, as ``generate(min_new_tokens=new_tokens)``
  does, so every step runs; :func:`greedy_decode` runs the same loop untimed and returns
  the tokens, which equal ``generate(max_new_tokens=new_tokens, min_new_tokens=new_tokens)``'s.
  Decode speed is ``prompts * (new_tokens - 1)`` tokens over the summed decode seconds of all batches.

Prefill and decode are timed in the same pass (the decode continues from the timed prefill's
cache), with ``time.perf_counter`` on CPU and synchronised ``torch.cuda.Event`` pairs on CUDA
(no host synchronisation inside the loop). Every variant gets the same encoded batches; within
each warm-up round and repeat the variants run one after the other (original, planned,
original, planned, ...) so that slow drift of a shared machine hits all of them alike.

The KV cache's bytes are read from its tensors at the end of each batch's decoding (on every
device). Peak memory is ``torch.cuda.max_memory_allocated`` over a run (reset before each run;
weights included). On CPU it is NaN: torch keeps no allocator statistics for CPU memory, and the
process's resident size cannot be reset between variants.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel, ProcessorMixin

from eemllm_models import EfficiencyPlan, build_prompt
from eemllm_models.generation import encode_prompts
from eemllm_models.apply import applied_plan
from eemllm_models.machine import describe
from eemllm_models.plan import n_decoder_layers

from .memory import cache_bytes

SUMMARY_COLUMNS = ("variant", "prefill_ms", "prefill_ms_iqr", "decode_tokens_per_s", "decode_tokens_per_s_iqr",
                   "peak_memory_mb", "kv_cache_bytes", "prefill_speedup", "decode_speedup", "prefill_speedup_low",
                   "prefill_speedup_high", "decode_speedup_low", "decode_speedup_high", "noisy", "repeats", "batch",
                   "prompt_tokens", "new_tokens", "device", "dtype")
NOISY_SPREAD = 0.1
"""A speedup is flagged ``noisy`` when its interval includes 1.0 or when the prefill repeats of its
variant or of the reference spread (IQR) more than this share of their median: a busy machine can
give a steady but wrong ratio (0.76x on a loaded machine, 1.37x idle, for the same plan)."""
RAW_COLUMNS = ("variant", "repeat", "prefill_ms", "decode_ms", "decode_tokens_per_s", "peak_memory_mb")
_MIB = 2**20


class _Clock:
    """Marks on the host clock (CPU) or CUDA events on the current stream (GPU), read after a sync."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1000


def _eos_ids(model: PreTrainedModel) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [] if eos is None else [int(eos)] if isinstance(eos, int) else [int(i) for i in eos]


def _greedy(model: PreTrainedModel, inputs: Mapping[str, torch.Tensor], new_tokens: int,
            clock: _Clock) -> tuple[torch.Tensor, float, float, int]:
    """Tokens ``[batch, new_tokens]``, prefill seconds, decode seconds and the bytes of the KV cache at the end
    (the prompt and ``new_tokens - 1`` decoded tokens; :func:`analyses.measuring.memory.cache_bytes`)."""
    input_ids = inputs["input_ids"]
    kwargs = {k: v for k, v in inputs.items() if k != "input_ids"}
    mask = kwargs.get("attention_mask")
    if "position_ids" not in kwargs and "position_ids" in inspect.signature(model.forward).parameters:
        # what generate() does: the model's own rule (text positions from the padding mask; M-RoPE's 3D
        # positions for the Qwen-VL families); transformers releases without that hook: the text rule
        rule = getattr(model, "_prepare_position_ids_for_generation", None)
        if rule is not None:
            kwargs["position_ids"] = rule(input_ids, {**kwargs, "input_ids": input_ids})
        elif mask is not None:
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        else:
            kwargs["position_ids"] = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # < 5.24
    kv_cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    kwargs.update({cache_name: kv_cache}, use_cache=True, logits_to_keep=1)
    eos = _eos_ids(model)
    if clock.cuda:
        torch.cuda.synchronize()
    start = clock.mark()
    step_inputs = model.prepare_inputs_for_generation(input_ids, is_first_iteration=True, **kwargs)
    logits = model(**step_inputs, return_dict=True).logits
    prefilled = clock.mark()
    generated = []
    for step in range(new_tokens):
        scores = logits[:, -1].float()
        if eos:
            scores[:, eos] = -math.inf
        token = scores.argmax(-1)
        generated.append(token)
        if step == new_tokens - 1:
            break
        input_ids = torch.cat([input_ids, token[:, None]], dim=-1)
        if (mask := kwargs.get("attention_mask")) is not None:
            kwargs["attention_mask"] = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        if (positions := kwargs.get("position_ids")) is not None:
            kwargs["position_ids"] = torch.cat([positions, positions[..., -1:] + 1], dim=-1)
        if (types := kwargs.get("mm_token_type_ids")) is not None:
            kwargs["mm_token_type_ids"] = torch.cat([types, types.new_zeros((types.shape[0], 1))], dim=-1)
        if (types := kwargs.get("token_type_ids")) is not None:
            kwargs["token_type_ids"] = torch.cat([types, types[:, -1:]], dim=-1)
        step_inputs = model.prepare_inputs_for_generation(input_ids, next_sequence_length=1,
                                                          is_first_iteration=False, **kwargs)
        logits = model(**step_inputs, return_dict=True).logits
    done = clock.mark()
    return (torch.stack(generated, dim=1), clock.seconds(start, prefilled), clock.seconds(prefilled, done),
            cache_bytes(kv_cache))


@torch.inference_mode()
def greedy_decode(model: PreTrainedModel, inputs: Mapping[str, torch.Tensor], new_tokens: int = 16) -> torch.Tensor:
    """The loop that :func:`measure_latency` times, untimed: greedy tokens ``[batch, new_tokens]``.

    ``inputs`` is a processor batch on the model's device (``input_ids`` ``[batch, seq]``, its
    ``attention_mask``, pixel inputs). End-of-sequence is suppressed, so the result equals
    ``generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)``
    without the prompt (for a generation config with no other logits processors, such as a
    repetition penalty).
    """
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be at least 1, got {new_tokens}")
    return _greedy(model, inputs, new_tokens, _Clock(model.device))[0]


def time_greedy(model: PreTrainedModel, inputs: Mapping[str, torch.Tensor], new_tokens: int = 16
                ) -> tuple[float, float]:
    """Seconds of the prefill and of the ``new_tokens - 1`` decoding steps of one :func:`greedy_decode`
    (CUDA events on CUDA): what :func:`measure_latency` times, for callers with their own inputs."""
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be at least 2 to time a decoding step, got {new_tokens}")
    _, prefill, decode, _ = _greedy(model, inputs, new_tokens, _Clock(model.device))
    return prefill, decode


ENCODED_BATCHES_KEPT_BYTES = 256 * 2**20
"""Encoded batches are kept between runs up to this many bytes of tensors; batches past it are encoded
again for every run (the same prompts give the same tensors), so memory stays flat in the number of prompts."""


class _Batches:
    """The left-padded encoded batches of ``batch_size`` prompts, encoded when a run first needs them.

    ``images`` and ``questions`` are sliced one batch at a time, so lazy sequences (such as
    :meth:`analyses.evaluating.benchmarks.RowRanges.column`) are read, and their images decoded, per batch.
    The first batches are kept while they fit in ``kept_bytes``; the rest are encoded again on each
    pass. ``prompt_tokens``: the longest padded batch seen so far.
    """

    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin, images: Sequence[Image.Image],
                 questions: Sequence[str], batch_size: int, kept_bytes: int = ENCODED_BATCHES_KEPT_BYTES) -> None:
        self.model, self.processor, self.images, self.questions = model, processor, images, questions
        self.starts = range(0, len(questions), batch_size)
        self.batch_size, self.kept_bytes = batch_size, kept_bytes
        self.kept: list[dict[str, torch.Tensor]] = []
        self.kept_total = 0
        self.prompt_tokens = 0

    def __len__(self) -> int:
        return len(self.starts)

    def __iter__(self):
        for k, start in enumerate(self.starts):
            if k < len(self.kept):
                yield self.kept[k]
                continue
            stop = start + self.batch_size
            prompts = [build_prompt(self.processor, q) for q in self.questions[start:stop]]
            batch = dict(encode_prompts(self.model, self.processor, self.images[start:stop], prompts, "left"))
            self.prompt_tokens = max(self.prompt_tokens, batch["input_ids"].shape[1])
            size = sum(t.numel() * t.element_size() for t in batch.values() if isinstance(t, torch.Tensor))
            if k == len(self.kept) and self.kept_total + size <= self.kept_bytes:
                self.kept.append(batch)
                self.kept_total += size
            yield batch
            del batch


def _check(model, images, questions, plans, new_tokens, warmup, repeats, batch_size) -> None:
    if not plans:
        raise ValueError("no variants to time; pass plans={'original': None, 'planned': plan}")
    for name, plan in plans.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"variant names must be non-empty strings, got {name!r}")
        if plan is not None and not isinstance(plan, EfficiencyPlan):
            raise ValueError(f"variant {name!r} is a {type(plan).__name__}; pass an EfficiencyPlan, "
                             "or None for the original model")
        if plan is not None:
            plan.check_layers(n_decoder_layers(model), type(model).__name__)
    if len(images) != len(questions):
        raise ValueError(f"got {len(images)} images for {len(questions)} questions; pass one image per question")
    if not questions:
        raise ValueError("no questions to time; pass at least one image and question")
    for label, value, least in (("new_tokens", new_tokens, 2), ("warmup", warmup, 0), ("repeats", repeats, 1)):
        if value < least:
            raise ValueError(f"{label} must be at least {least}, got {value}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 (or None for one batch), got {batch_size}")
    if applied_plan(model) is not None:
        raise ValueError("a plan is already applied to this model, so it is not the original; "
                         "remove it first (handle.remove()) and pass it in plans instead")
    if model.training:
        raise ValueError("the model is in training mode (dropout on); call model.eval() first")


@torch.inference_mode()
def measure_latency(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    plans: Mapping[str, EfficiencyPlan | None],
    new_tokens: int = 16,
    warmup: int = 2,
    repeats: int = 5,
    batch_size: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Median prefill time, decode speed and peak memory of each variant, with ratios to the first.

    ``plans`` maps a variant name to an :class:`EfficiencyPlan` applied for its runs (``None``:
    the model as it is). The prompts (one per ``questions[i]`` about ``images[i]``) are encoded
    left-padded, in batches of ``batch_size`` (``None``: one batch), one batch at a time: the
    sequences are sliced per batch (pass lazy ones, such as ``RowRanges.column``, for many prompts)
    and encoded batches are kept up to :data:`ENCODED_BATCHES_KEPT_BYTES`, later ones encoded again
    (untimed) for each run, so memory does not grow with the number of prompts. A run of a variant
    prefills and decodes every batch (see the module docstring for what is timed); ``warmup``
    untimed rounds, then ``repeats`` timed ones, each round running every variant in turn. The
    progress bar counts batches, with the time left.

    Returns one row per variant, in ``plans`` order, with columns:

    * ``variant``; ``prefill_ms`` and ``prefill_ms_iqr``: median and interquartile range over the
      repeats of the time to prefill all batches;
    * ``decode_tokens_per_s`` and ``decode_tokens_per_s_iqr``: the same for decode throughput,
      ``prompts * (new_tokens - 1)`` tokens over the summed decode time of all batches;
    * ``peak_memory_mb``: the largest ``torch.cuda.max_memory_allocated`` of its runs, in MiB
      (NaN on CPU);
    * ``kv_cache_bytes``: the largest KV cache of its batches at the end of decoding (the prompt and
      ``new_tokens - 1`` decoded tokens), in bytes, measured from the cache's tensors; it equals
      :func:`analyses.measuring.memory.kv_cache_bytes` (a plan that withdraws visual tokens holds
      fewer positions in the layers after the drop);
    * ``prefill_speedup`` and ``decode_speedup``: the median over repeats of the paired ratio to
      the first variant's run of the same repeat (its prefill time / this one's; this one's
      tokens/s / its), so the first variant has 1.0. Pairing runs made side by side cancels the
      machine's drift between repeats, which a ratio of medians would keep;
    * ``repeats``, ``batch`` (sequences per forward), ``prompt_tokens`` (padded prompt length of
      the longest batch, visual tokens included), ``new_tokens``, ``device``, ``dtype``.

    ``frame.attrs`` holds ``warmup``, ``prompts``, ``machine`` (:func:`eemllm_models.machine.describe`)
    and ``raw``, the per-repeat measurements as a dict of lists: ``pd.DataFrame(frame.attrs["raw"])``
    has columns ``variant``, ``repeat``, ``prefill_ms``, ``decode_ms``, ``decode_tokens_per_s``,
    ``peak_memory_mb`` (a dict, not a frame, so that ``pd.concat`` of results keeps working).
    """
    _check(model, images, questions, plans, new_tokens, warmup, repeats, batch_size)
    batch_size = len(questions) if batch_size is None else batch_size
    batches = _Batches(model, processor, images, questions, batch_size)
    device = model.device
    clock = _Clock(device)
    rows = []
    kv_cache: dict[str, int] = {}
    bar = tqdm(total=(warmup + repeats) * len(plans) * len(batches), desc="latency", unit="batch",
               disable=not progress)
    with torch.cuda.device(device) if clock.cuda else contextlib.nullcontext():
        for round_ in range(warmup + repeats):
            for name, plan in plans.items():
                if clock.cuda:
                    torch.cuda.reset_peak_memory_stats()
                handle = plan.applied(model) if plan is not None else None
                try:
                    times = []
                    for batch in batches:
                        _, prefill, decode, kv_bytes = _greedy(model, batch, new_tokens, clock)
                        times.append((prefill, decode))
                        kv_cache[name] = max(kv_cache.get(name, 0), kv_bytes)
                        bar.update()
                finally:
                    if handle is not None:
                        handle.remove()
                peak = torch.cuda.max_memory_allocated() / _MIB if clock.cuda else math.nan
                if round_ < warmup:
                    continue
                prefill, decode = (sum(t[i] for t in times) for i in (0, 1))
                rows.append({"variant": name, "repeat": round_ - warmup, "prefill_ms": 1000 * prefill,
                             "decode_ms": 1000 * decode,
                             "decode_tokens_per_s": len(questions) * (new_tokens - 1) / decode,
                             "peak_memory_mb": peak})
    bar.close()
    raw = pd.DataFrame(rows, columns=list(RAW_COLUMNS))
    summary = _summarize(raw, list(plans))
    summary["kv_cache_bytes"] = summary.variant.map(kv_cache)
    summary["repeats"] = repeats
    summary["batch"] = batch_size
    summary["prompt_tokens"] = batches.prompt_tokens
    summary["new_tokens"] = new_tokens
    summary["device"] = str(device)
    summary["dtype"] = str(model.dtype).removeprefix("torch.")
    summary.attrs.update(warmup=warmup, prompts=len(questions), machine=describe(),
                         raw=raw.to_dict(orient="list"))
    return summary[list(SUMMARY_COLUMNS)]


def _iqr(values: pd.Series) -> float:
    q1, q3 = np.percentile(values, [25, 75])
    return float(q3 - q1)


def _summarize(raw: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    grouped = raw.groupby("variant", sort=False)
    summary = pd.DataFrame({
        "prefill_ms": grouped["prefill_ms"].median(),
        "prefill_ms_iqr": grouped["prefill_ms"].agg(_iqr),
        "decode_tokens_per_s": grouped["decode_tokens_per_s"].median(),
        "decode_tokens_per_s_iqr": grouped["decode_tokens_per_s"].agg(_iqr),
        "peak_memory_mb": grouped["peak_memory_mb"].max(),
    }).loc[order]
    prefill = raw.pivot(index="repeat", columns="variant", values="prefill_ms")
    decode = raw.pivot(index="repeat", columns="variant", values="decode_tokens_per_s")
    summary["prefill_speedup"] = prefill.rdiv(prefill[order[0]], axis=0).median()
    summary["decode_speedup"] = decode.div(decode[order[0]], axis=0).median()
    # Paired-ratio intervals (bootstrap of the median per-repeat ratio); "noisy": the prefill interval includes 1.0,
    # or this variant's or the reference's prefill repeats spread (IQR) more than NOISY_SPREAD of their median.
    from probes.uncertainty import interval_attrs, paired_ratio_interval

    for name in order:
        _, summary.loc[name, "prefill_speedup_low"], summary.loc[name, "prefill_speedup_high"] = (
            paired_ratio_interval(prefill[order[0]], prefill[name]))
        _, summary.loc[name, "decode_speedup_low"], summary.loc[name, "decode_speedup_high"] = (
            paired_ratio_interval(decode[name], decode[order[0]]))
    spread = summary.prefill_ms_iqr / summary.prefill_ms
    summary["noisy"] = ((summary.prefill_speedup_low <= 1.0) & (summary.prefill_speedup_high >= 1.0)
                        | (spread > NOISY_SPREAD) | (spread[order[0]] > NOISY_SPREAD))
    summary.loc[order[0], "noisy"] = False  # the reference itself: its ratio is 1 by definition
    summary.attrs.update({**interval_attrs(), "interval_method": "bootstrap of the median paired ratio over repeats"})
    return summary.rename_axis("variant").reset_index()
