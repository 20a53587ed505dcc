"""lmms-eval model plugin: run the papers' own harness under a plan on a checkpoint of any supported family
(LLaVA, Qwen-VL, InternVL, Idefics3, SmolVLM, Gemma 3, ...: ``eemllm_models.families.FAMILIES``).

Install the extra (``pip install "eemllm[lmms]"``); lmms-eval then finds the model ``eemllm``
through the ``lmms_eval.models`` entry point (:func:`manifest`)::

    python -m lmms_eval --model eemllm \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,plan=shortv:llava-1.5-7b,dtype=float16 \\
        --tasks pope --batch_size 1 --output_path results/

``pretrained`` is a hub name, a local model directory, a pruned model directory written by
``eemllm prune`` (its plan is applied), or ``default`` (the shipped default model); ``plan`` is a
preset or a plan JSON file. Batch size 1, the default, reproduces scores; larger batches pad
prompts on the left, which can move scores slightly. Only lmms-eval imports this module: the rest
of eemllm works without it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm.auto import tqdm
from transformers import PreTrainedModel, ProcessorMixin, StoppingCriteria, StoppingCriteriaList

from eemllm_models import EfficiencyPlan, apply_plan, build_prompt, is_pruned, load_checkpoint
from eemllm_models.apply import applied_plan
from eemllm_models.generation import encode_prompts

logger = logging.getLogger(__name__)

MODEL_ID = "eemllm"
DEFAULT_MAX_NEW_TOKENS = 1024
"""``max_new_tokens`` when a task's ``generation_kwargs`` name none (as lmms-eval's ``llava_hf``)."""
_USED_GEN_KWARGS = {"until", "max_new_tokens", "temperature", "do_sample", "top_p", "num_beams"}


def manifest():
    """The ``lmms_eval.models`` entry point: registers :class:`EemllmLlava` as the simple model ``eemllm``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.{EemllmLlava.__name__}")


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not a torch dtype; pass e.g. dtype=float32, bfloat16, float16 or auto")
    return resolved


def load_for_lmms(pretrained: str, plan: str | os.PathLike | EfficiencyPlan | None = None,
                  dtype: str | torch.dtype = "auto", device_map: str | None = None,
                  attn_implementation: str | None = None, implementation: str = "fast",
                  ) -> tuple[PreTrainedModel, ProcessorMixin, EfficiencyPlan | None]:
    """The model (eval mode, ``plan`` applied), its processor and the plan in force.

    ``pretrained`` is ``default``, a hub name, a model directory, or a pruned model directory
    (whose plan is applied; naming another ``plan`` for it is an error).
    """
    dtype = _torch_dtype(dtype)
    chosen = plan if plan is None or isinstance(plan, EfficiencyPlan) else EfficiencyPlan.resolve(plan)
    if is_pruned(pretrained) and chosen is not None:
        raise ValueError(f"{pretrained} is a pruned model that carries its own plan; drop plan= from "
                         "--model_args, or load the unpruned model to apply another plan")
    model, processor = load_checkpoint(pretrained, dtype, device_map, attn_implementation, implementation)
    if chosen is not None:
        apply_plan(model, chosen, implementation)
    carried = applied_plan(model)
    return model, processor, carried.plan if carried else None


def generation_settings(gen_kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``generate()`` keyword arguments and stop strings from an lmms-eval task's ``generation_kwargs``.

    ``temperature`` 0 (the default) or ``do_sample: false`` means greedy decoding; ``until`` (a
    string or a list) gives the stop strings; keys other than ``until``, ``max_new_tokens``,
    ``temperature``, ``do_sample``, ``top_p`` and ``num_beams`` are ignored with a warning.
    """
    ignored = sorted(set(gen_kwargs) - _USED_GEN_KWARGS)
    if ignored:
        logger.warning("eemllm: ignoring generation_kwargs %s (it uses %s)", ignored, sorted(_USED_GEN_KWARGS))
    until = gen_kwargs.get("until") or []
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, (list, tuple)):
        raise TypeError(f"generation_kwargs['until'] must be a string or a list of strings, got {until!r}")
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    sample = temperature > 0 and bool(gen_kwargs.get("do_sample", True))
    settings: dict[str, Any] = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
                                "num_beams": int(gen_kwargs.get("num_beams") or 1), "do_sample": sample}
    if sample:
        settings["temperature"] = temperature
        if gen_kwargs.get("top_p") is not None:
            settings["top_p"] = float(gen_kwargs["top_p"])
    return settings, [s for s in until if s]


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string (all of it when none occurs)."""
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(ends)] if ends else text


class StopOnStrings(StoppingCriteria):
    """Stop each sequence once its generated text holds one of ``stops``.

    Decodes the tokens after the prompt's ``prompt_length``, so it works with any tokenizer
    (transformers' ``stop_strings`` needs a subword vocabulary and fails on word-level ones).
    """

    def __init__(self, tokenizer, stops: Sequence[str], prompt_length: int) -> None:
        self.tokenizer, self.stops, self.prompt_length = tokenizer, list(stops), prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        """``input_ids`` ``[batch, position]`` -> done ``[batch]`` (bool)."""
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


class EemllmLlava(lmms):
    """lmms-eval "simple" model: an HF image-text model with an eemllm plan applied, answering with ``generate()``.

    Arguments come from ``--model_args`` (``key=value,...``); ``device`` and ``batch_size`` from
    lmms-eval's ``--device`` and ``--batch_size`` flags (naming them in ``--model_args`` too is an
    error in lmms-eval). ``device`` defaults to the process's CUDA device when there is one, else
    the CPU; with ``device_map`` (e.g. ``auto``) accelerate places the model instead.
    ``max_batch_size`` is accepted because lmms-eval passes it, and unused (no automatic batch size).
    """

    is_simple = True

    def __init__(self, pretrained: str = "default", plan: str | None = None, device: str | None = None,
                 dtype: str = "auto", batch_size: int | str = 1, device_map: str | None = None,
                 attn_implementation: str | None = None, implementation: str = "fast",
                 max_batch_size: int | None = None) -> None:
        super().__init__()
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer (1 reproduces scores), got {batch_size!r}")
        self.batch_size = int(batch_size)
        self.pretrained = str(pretrained)
        self.model, self.processor, self.plan = load_for_lmms(self.pretrained, plan, dtype, device_map,
                                                              attn_implementation, implementation)
        if device_map is None:
            if device is None:
                device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
            self.model.to(device)
        self._device = self.model.device

    @property
    def device(self) -> torch.device:
        return self._device

    def _visuals(self, doc_to_visual: Callable | None, doc_id: int, task: str, split: str) -> list[Image.Image]:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        visuals = [visuals] if isinstance(visuals, Image.Image) else list(visuals or [])
        for visual in visuals:
            if not isinstance(visual, Image.Image):
                raise TypeError(f"task {task!r} gave a {type(visual).__name__} visual for doc {doc_id}; the eemllm "
                                 "model takes images only (PIL), not video or audio")
        return [v.convert("RGB") for v in visuals]

    def _prompt(self, context: str, n_images: int) -> str:
        """The chat prompt; a context that already holds the image token places the images itself."""
        image_token = getattr(self.processor, "image_token", None)
        in_text = bool(image_token) and image_token in context
        return build_prompt(self.processor, context, 0 if in_text else n_images)

    def _encode(self, prompts: list[str], images: list[Image.Image]):
        return encode_prompts(self.model, self.processor, images or None, prompts)

    @torch.inference_mode()
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """One answer per request; ``Instance.args`` = (context, gen_kwargs, doc_to_visual, doc_id, task, split).

        Requests with the same ``gen_kwargs`` are answered in batches of ``batch_size``; answers
        are cut at the first stop string and stripped.
        """
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        answers: list[str] = [""] * len(requests)
        progress = tqdm(total=len(requests), desc="eemllm answering", disable=self.rank != 0)
        for indices in groups.values():
            settings, stops = generation_settings(requests[indices[0]].args[1])
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                prompts, images = [], []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    visuals = self._visuals(doc_to_visual, doc_id, task, split)
                    prompts.append(self._prompt(context, len(visuals)))
                    images += visuals
                batch = self._encode(prompts, images)
                n_prompt = batch["input_ids"].shape[1]
                stop = StoppingCriteriaList([StopOnStrings(self.processor, stops, n_prompt)] if stops else [])
                out = self.model.generate(**batch, **settings, stopping_criteria=stop)
                texts = self.processor.batch_decode(out[:, n_prompt:], skip_special_tokens=True)
                for i, text in zip(chunk, texts):
                    answers[i] = cut_at_stop(text, stops).strip()
                progress.update(len(chunk))
        progress.close()
        return answers

    @torch.inference_mode()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(sum of log-probabilities of the continuation given context and images, whether greedy decoding
        would produce it) per request.

        ``Instance.args`` = (context, continuation or doc_to_target, doc_to_visual, doc_id, task, split),
        or (context, continuation) without images. The context goes through the chat template
        (as in :meth:`generate_until`); the continuation follows the assistant prompt verbatim.
        """
        results = []
        for request in tqdm(requests, desc="eemllm loglikelihood", disable=self.rank != 0):
            context, continuation, *where = request.args
            doc_to_visual, doc_id, task, split = where if where else (None, None, None, None)
            if callable(continuation):
                continuation = continuation(self.task_dict[task][split][doc_id])
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            prompt = self._prompt(context, len(visuals))
            n_context = self._encode([prompt], visuals)["input_ids"].shape[1]
            batch = self._encode([prompt + str(continuation)], visuals)
            targets = batch["input_ids"][0, n_context:]
            if targets.numel() == 0:
                raise ValueError(f"the continuation {continuation!r} adds no tokens to the prompt of doc {doc_id} "
                                 f"of task {task!r}; a loglikelihood request needs a non-empty continuation")
            logits = self.model(**batch).logits[0, n_context - 1 : -1].float()
            logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]
            results.append((float(logprobs.sum()), bool((logits.argmax(-1) == targets).all())))
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the eemllm lmms-eval model answers single-turn tasks (generate_until, "
                                  "loglikelihood, multiple_choice); multi-round tasks are not supported")
