"""Token counts of real prompts: the one place FLOPs counts, policies, plans and reports get them from.

A FLOPs figure needs the prompt's text and visual token counts. Every command takes them from
here, in this order (:func:`resolve_token_counts`):

1. counts given explicitly (``eemllm flops --text-tokens/--visual-tokens``);
2. the counts a plan recorded in its provenance when it was made (``tokens``: the mean prompt of
   the rows it was chosen or scored on, and where they came from);
3. for the ShortV paper's models (configs shipped in ``analyses/measuring/model_configs``), the paper's
   convention: 64 text tokens and 576 (LLaVA-1.5) or 2880 (LLaVA-NeXT) visual tokens;
4. for a model with a processor (``default``, a model or pruned-model folder), the mean prompt
   of :data:`DEFAULT_ROWS` of shapes-vqa (the demo's evaluation questions) through its processor.

With a model and a data set at hand (the demo, ``eemllm plan``/``compare``),
:func:`dataset_token_counts` counts that data set's own prompts, and ``flops.flops_provenance``
records them with the plan, so ``eemllm flops --plan plan.json`` prints the same ratio.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import datasets
from PIL import Image
from transformers import AutoProcessor, PretrainedConfig, PreTrainedModel, ProcessorMixin

from eemllm_models import EfficiencyPlan, TokenLayout, build_prompt, load_shapes_vqa
from eemllm_models.layout import visual_token_ids

from analyses.measuring.flops import MODEL_CONFIGS, PAPER_VISUAL_TOKENS, TokenCounts, load_config

DEFAULT_ROWS = {"split": "test", "n": 28, "seed": 0}
"""The shapes-vqa questions whose mean prompt stands for a model's prompts when no data set is named:
the demo's evaluation questions at its defaults (``eemllm demo``)."""
PAPER_TEXT_TOKENS = 64
"""Text tokens per prompt in the ShortV paper's FLOPs counts."""


def _config_of(model: PreTrainedModel | PretrainedConfig) -> PretrainedConfig:
    return model if isinstance(model, PretrainedConfig) else model.config


def prompt_token_counts(model: PreTrainedModel | PretrainedConfig, processor: ProcessorMixin, image: Image.Image,
                        question: str) -> TokenCounts:
    """Text and visual tokens of the chat-template prompt that asks ``question`` about ``image``.

    ``model``: the model or just its config (visual tokens are found by the config's image token ids).
    """
    ids = processor(images=[image], text=[build_prompt(processor, question)], return_tensors="pt")["input_ids"]
    return TokenCounts.from_layout(TokenLayout.from_input_ids(ids, visual_token_ids(_config_of(model))))


def each_prompt_token_counts(model: PreTrainedModel | PretrainedConfig, processor: ProcessorMixin,
                             data: datasets.Dataset, image_column: str = "image",
                             question_column: str = "question") -> list[TokenCounts]:
    """The token counts of every row's prompt (``len(data)`` entries, in row order)."""
    for column in (image_column, question_column):
        if column not in data.column_names:
            raise ValueError(f"the data set has no column {column!r} (its columns: {data.column_names}); name the "
                             "right one with image_column=/question_column=")
    if len(data) == 0:
        raise ValueError("the data set has no rows to count tokens of; pass at least one row")
    return [prompt_token_counts(model, processor, row[image_column], row[question_column]) for row in data]


def dataset_token_counts(model: PreTrainedModel | PretrainedConfig, processor: ProcessorMixin,
                         data: datasets.Dataset, image_column: str = "image",
                         question_column: str = "question") -> TokenCounts:
    """The mean prompt (:meth:`TokenCounts.mean`) of ``data``'s rows: what FLOPs are counted for."""
    return TokenCounts.mean(each_prompt_token_counts(model, processor, data, image_column, question_column))


def describe_rows(data: datasets.Dataset) -> str:
    """Where token counts came from, in words: ``"mean prompt of shapes-vqa test (n=28)"``."""
    split = f" {data.split}" if data.split is not None else ""
    return f"mean prompt of {data.info.dataset_name or 'the data set'}{split} (n={len(data)})"


def shapes_vqa_token_counts(model: PreTrainedModel | PretrainedConfig, processor: ProcessorMixin,
                            split: str = DEFAULT_ROWS["split"], n: int = DEFAULT_ROWS["n"],
                            seed: int = DEFAULT_ROWS["seed"]) -> TokenCounts:
    """The mean prompt of ``n`` shapes-vqa ``split`` questions (default :data:`DEFAULT_ROWS`)."""
    return dataset_token_counts(model, processor, load_shapes_vqa(split, n=n, seed=seed))


def recorded_tokens(plan: EfficiencyPlan) -> tuple[TokenCounts, str] | None:
    """The token counts (and their source) a plan recorded (``flops.flops_provenance``), if any."""
    entry = plan.provenance.get("tokens")
    if not isinstance(entry, Mapping):
        return None
    return TokenCounts.from_dict(entry), str(entry.get("source", "recorded in the plan"))


def paper_token_counts(config: PretrainedConfig) -> TokenCounts:
    """ShortV's convention for its models: :data:`PAPER_TEXT_TOKENS` text tokens and the paper's visual tokens."""
    model_type = getattr(config, "model_type", None)
    if model_type not in PAPER_VISUAL_TOKENS:
        raise ValueError(f"no paper visual-token count for model type {model_type!r}; pass visual tokens")
    return TokenCounts(0, PAPER_VISUAL_TOKENS[model_type], PAPER_TEXT_TOKENS)


def is_paper_model(model: str) -> bool:
    """Whether ``model`` names a shipped ShortV paper config (``llava-1.5-7b``, ``llava-next-13b``, ...)."""
    return (MODEL_CONFIGS / f"{model}.json").is_file()


def _processor_for(model: str) -> ProcessorMixin:
    from eemllm_models.zoo import resolve

    model = resolve(model)
    try:
        return AutoProcessor.from_pretrained(str(Path(model).expanduser()))
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot count the prompts of {model!r}: no processor there ({err})") from err


def resolve_token_counts(model: str, plan: EfficiencyPlan | None = None, config: PretrainedConfig | None = None,
                         text_tokens: int | None = None, visual_tokens: int | None = None
                         ) -> tuple[TokenCounts, str]:
    """The prompt a FLOPs figure for ``model`` (and ``plan``) is counted for, and its source in words.

    See the module docstring for the order. ``text_tokens``/``visual_tokens`` override the matching
    counts of whatever source is used. Raises ``ValueError`` when nothing gives the counts.
    """
    config = load_config(model) if config is None else config
    recorded = recorded_tokens(plan) if plan is not None else None
    if recorded is not None:
        tokens, source = recorded
    elif is_paper_model(model):
        tokens, source = paper_token_counts(config), "ShortV's convention: 64 text tokens, the paper's visual tokens"
    else:
        try:
            tokens = shapes_vqa_token_counts(config, _processor_for(model))
            source = f"mean prompt of shapes-vqa {DEFAULT_ROWS['split']} (n={DEFAULT_ROWS['n']})"
        except ValueError:
            if text_tokens is None or visual_tokens is None:
                raise
            tokens, source = TokenCounts(0, visual_tokens, text_tokens), "given"
    if text_tokens is not None or visual_tokens is not None:
        tokens = TokenCounts(0 if text_tokens is not None else tokens.text_before,
                             tokens.visual if visual_tokens is None else visual_tokens,
                             tokens.text_after if text_tokens is None else text_tokens)
        source = "given" if text_tokens is not None and visual_tokens is not None else f"{source}, partly given"
    return tokens, source
