"""Attention statistics per layer and head, reduced on the fly one layer at a time.

A forward pre-hook on each decoder layer recomputes that layer's attention probabilities
``[batch, head, query, key]`` from its input (its own norm, q/k projections, rotary embedding
and the model's mask), reduces them to a few numbers per head and drops them before the next
layer runs: the model keeps its fast attention implementation, and no more than one layer's
attention map is ever held. On a model with a plan applied, each layer's statistics are those of
the attention it runs in its mode: ``naavit``/``composite`` visual queries under their mode's mask,
and no visual queries at all in a ``frozen`` layer (their statistics are NaN).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import xarray as xr
from transformers import PreTrainedModel, ProcessorMixin
from transformers.models.llama.modeling_llama import repeat_kv

from eemllm_models import TokenLayout, token_layout
from eemllm_models.apply import current_plan
from eemllm_models.families import family_of
from eemllm_models.anatomy import style_of
from eemllm_models.modes import allowed_keys, mode_mask, rotate

from .runner import ProbeInputs, PromptedBatch, run_probe

HEAD_STATISTICS = {
    "text_to_visual": "attention mass from text queries to visual keys",
    "visual_to_visual": "attention mass from visual queries to other visual keys",
    "visual_to_text": "attention mass from visual queries to text keys",
    "last_to_visual": "attention mass from the last prompt position to visual keys",
    "to_self": "attention mass of a query on its own position",
    "to_sink": "attention mass on the first sink_tokens positions of the sequence",
}
QUERY_GROUPS = ("visual", "text")


def attention_probabilities(layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict, mode: str = "full",
                            layout: TokenLayout | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``layer``'s attention probabilities ``[batch, head, seq, seq]`` (float32) for input
    ``hidden`` ``[batch, seq, hidden]``, and the allowed-key mask ``[batch, 1, seq, seq]`` they used.

    ``mode``: the layer's mode for visual tokens; ``naavit`` and ``composite`` restrict the visual
    queries' keys as the mode does (``layout`` says which tokens are visual). A ``frozen`` layer
    forms no visual queries: their rows are computed but describe nothing the model does.
    """
    attn = layer.self_attn
    batch, seq, _ = hidden.shape
    cos, sin = (t.expand(batch, -1, -1) for t in kwargs["position_embeddings"])
    normed = layer.input_layernorm(hidden)
    style = style_of(layer)
    query = rotate(style.queries(attn, normed).transpose(1, 2), cos, sin)
    key = repeat_kv(rotate(style.keys(attn, normed).transpose(1, 2), cos, sin), attn.num_key_value_groups)
    allowed = allowed_keys(kwargs.get("attention_mask"), batch, seq, seq, hidden.device)
    if mode in ("naavit", "composite"):
        allowed = mode_mask(mode, layout, allowed)
    scores = torch.matmul(query.float(), key.float().transpose(2, 3)) * attn.scaling
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.nan_to_num(probs, nan=0.0), allowed


def _mean_over(values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """``values`` ``[batch, head, seq]`` averaged over the queries ``[batch, seq]`` -> ``[batch, head]``."""
    weights = queries[:, None, :].float()
    return (values * weights).sum(-1) / weights.sum(-1)


def _layer_statistics(probs: torch.Tensor, layout, sink_tokens: int, last: torch.Tensor,
                      visual_queries: bool = True) -> dict[str, torch.Tensor]:
    """Head statistics ``[batch, head]`` and query-group entropies ``[batch, head, 2]`` of one layer.

    ``visual_queries`` False (a ``frozen`` layer): the visual tokens form no queries, so the
    statistics of visual queries are NaN and the others average over the text queries only.
    """
    visual, text, valid = layout.visual, layout.text, layout.valid  # key sides: every visual token is a key
    visual_q = visual if visual_queries else torch.zeros_like(visual)  # query sides
    queries = valid if visual_queries else text
    to_visual = (probs * visual[:, None, None, :]).sum(-1)  # [B, H, T]
    to_text = (probs * text[:, None, None, :]).sum(-1)
    own = probs.diagonal(dim1=-2, dim2=-1)
    sinks = valid & (valid.cumsum(-1) <= sink_tokens)
    to_sink = (probs * sinks[:, None, None, :]).sum(-1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
    batch_index = torch.arange(probs.shape[0], device=probs.device)
    return {
        "text_to_visual": _mean_over(to_visual, text),
        "visual_to_visual": _mean_over(to_visual - own, visual_q),
        "visual_to_text": _mean_over(to_text, visual_q),
        "last_to_visual": to_visual[batch_index, :, last],
        "to_self": _mean_over(own, queries),
        "to_sink": _mean_over(to_sink, queries),
        "entropy": torch.stack([_mean_over(entropy, visual_q), _mean_over(entropy, text)], dim=-1),
    }


def attention_statistics_batch(model: PreTrainedModel, batch: PromptedBatch, sink_tokens: int = 1
                               ) -> dict[str, torch.Tensor]:
    """Statistics of every layer: ``[batch, layer, head]`` each, ``entropy`` ``[batch, layer, head, group]``.

    On a model with a plan applied, each layer's statistics describe the attention it runs in its
    mode (see :func:`attention_probabilities`; a ``frozen`` layer's visual-query statistics are NaN).
    """
    layers = family_of(model).decoder_layers(model)
    modes = current_plan(model).modes
    layout = token_layout(model, batch.inputs["input_ids"], batch.inputs.get("attention_mask"))
    last = batch.positions[:, 0]
    per_layer: list[dict[str, torch.Tensor]] = []

    def reduce(module, args, kwargs, mode: str):
        hidden = args[0] if args else kwargs["hidden_states"]
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        probs, _ = attention_probabilities(module, hidden, {**kwargs, "attention_mask": mask}, mode, layout)
        stats = _layer_statistics(probs, layout, sink_tokens, last, visual_queries=mode != "frozen")
        per_layer.append({k: v.cpu() for k, v in stats.items()})

    handles = [layer.register_forward_pre_hook(partial(reduce, mode=mode), with_kwargs=True)
               for layer, mode in zip(layers, modes)]
    try:
        model(**batch.inputs, use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return {k: torch.stack([stats[k] for stats in per_layer], dim=1) for k in per_layer[0]}


def attention_statistics(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    dataset,
    samples: int | None = 40,
    seed: int = 0,
    batch_size: int = 8,
    sink_tokens: int = 1,
    prompt_template: str | None = None,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    **columns: str,
) -> xr.Dataset:
    """Attention statistics of every layer and head over ``samples`` prompts of ``dataset``.

    Returns an ``xarray.Dataset`` with, per ``[sample, layer, head]``, the variables of
    :data:`HEAD_STATISTICS` (attention mass, averaged over the queries named), and ``entropy``
    ``[sample, layer, head, query_group]`` (nats, mean over visual or text queries). Sample
    selection, prompts and ``columns`` as in :func:`probes.layer_contribution`.
    """
    if sink_tokens < 0:
        raise ValueError(f"sink_tokens must be >= 0, got {sink_tokens}")
    spec = ProbeInputs(dataset, samples, seed, batch_size, "last_prompt", prompt_template, **columns)
    heads = model.config.get_text_config().num_attention_heads

    def probe(batch: PromptedBatch) -> xr.Dataset:
        stats = attention_statistics_batch(model, batch, sink_tokens)
        dims = ("sample", "layer", "head")
        variables = {k: (dims, stats[k].numpy(), {"long_name": text}) for k, text in HEAD_STATISTICS.items()}
        variables["entropy"] = ((*dims, "query_group"), stats["entropy"].numpy(),
                                {"long_name": "attention entropy", "units": "nats"})
        return xr.Dataset(variables, coords={"layer": range(stats["entropy"].shape[1]), "head": range(heads),
                                             "query_group": list(QUERY_GROUPS)})

    return run_probe("attention_statistics", model, processor, spec, probe, {"sink_tokens": sink_tokens},
                     checkpoint, progress)
