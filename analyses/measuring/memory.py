"""KV-cache memory of a model under an :class:`~eemllm_models.EfficiencyPlan`: counted and measured.

Counted (:func:`kv_cache_rows`, :func:`kv_cache_bytes`) from the config, the plan and the prompt's
tokens, for the fast implementation that ``plan.applied(model)`` runs. Each decoder layer's cache
holds one key and one value ``[batch, kv_heads, positions, head_dim]``; a layer at or after a drop of
``visual_keep`` holds only the positions it still sees (the kept rows of the short sequence: text,
padding and ``floor(keep * n_visual)`` visual tokens per sequence, padded to the longest sequence of
the batch), plus one per decoded token; a sliding-window layer keeps at most its last
``sliding_window - 1`` (transformers' ``DynamicSlidingWindowLayer``). Layer modes change no cache.

Measured (:func:`cache_bytes`, :func:`prefill_kv_cache_bytes`) from the tensors a real cache holds.
The two are equal to the byte (``tests/test_withdrawal_flops.py``). On CUDA,
:func:`prefill_kv_cache_bytes` also reads the allocator's growth over the prefill, which includes the
prefill's other live tensors (the logits), so it bounds the cache from above rather than equals it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel

from eemllm_models import EfficiencyPlan, TokenLayout
from eemllm_models.withdrawal import kept_counts

from .flops import DecoderShape, TokenCounts


def kv_cache_rows(config: PretrainedConfig, plan: EfficiencyPlan, tokens: TokenCounts | TokenLayout,
                  decoded: int = 0) -> list[int]:
    """Per decoder layer, the positions its KV cache holds per sequence after the prefill of ``tokens`` and
    ``decoded`` further one-token forwards (``generate(max_new_tokens=k)`` makes ``k - 1``).

    ``tokens``: one prompt's :class:`~analyses.measuring.flops.TokenCounts`, or the
    :class:`~eemllm_models.TokenLayout` of a (padded) batch, whose sequences share one cache length
    per layer: the longest kept row count of the batch.
    """
    shape = DecoderShape.from_config(config)
    plan.check_layers(shape.layers, "the config")
    if decoded < 0:
        raise ValueError(f"decoded must be >= 0, got {decoded}")
    if isinstance(tokens, TokenCounts):
        seq, n_visual = tokens.total, torch.tensor([tokens.visual])
    else:
        seq, n_visual = tokens.visual.shape[1], tokens.n_visual.cpu()
    rows = []
    for layer, keep in enumerate(plan.visual_keep):
        removed = n_visual - kept_counts(keep, n_visual)
        held = seq - int(removed.min()) + decoded
        window = shape.sliding_windows[layer] if layer < len(shape.sliding_windows) else None
        rows.append(held if window is None else min(held, window - 1))
    return rows


def kv_cache_bytes(config: PretrainedConfig, plan: EfficiencyPlan, tokens: TokenCounts | TokenLayout,
                   decoded: int = 0, dtype: torch.dtype = torch.float32, batch: int | None = None) -> int:
    """Bytes of every key and value the KV cache holds (:func:`kv_cache_rows`), in ``dtype``.

    ``batch``: sequences in the cache (default: the layout's batch, or 1 for ``TokenCounts``).
    """
    shape = DecoderShape.from_config(config)
    if batch is None:
        batch = 1 if isinstance(tokens, TokenCounts) else tokens.visual.shape[0]
    per_position = 2 * shape.kv_heads * shape.head_dim * torch.empty((), dtype=dtype).element_size()
    return batch * per_position * sum(kv_cache_rows(config, plan, tokens, decoded))


def cache_bytes(kv_cache) -> int:
    """Bytes of the key and value tensors ``kv_cache`` (a transformers ``Cache``, e.g. ``DynamicCache``) holds."""
    layers = getattr(kv_cache, "layers", None)
    if layers is None:
        raise TypeError(f"cannot read the tensors of a {type(kv_cache).__name__}; pass a transformers Cache with "
                        "per-layer keys and values (DynamicCache)")
    total = 0
    for layer in layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


@torch.inference_mode()
def prefill_kv_cache_bytes(model: PreTrainedModel, batch: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Prefill ``batch`` (a processor batch on the model's device) into a fresh ``DynamicCache`` with the model
    as it is (its applied plan, if any) and measure the cache.

    Returns ``{"kv_cache_bytes": ...}`` (from the cache's tensors) and, on CUDA,
    ``"allocated_bytes"``: ``torch.cuda.memory_allocated`` after the prefill minus before it (the cache
    plus the other tensors still alive, such as the last position's logits).
    """
    cuda = model.device.type == "cuda"
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # < 5.24
    kv_cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    if cuda:
        torch.cuda.synchronize(model.device)
        before = torch.cuda.memory_allocated(model.device)
    out = model(**batch, **{name: kv_cache}, use_cache=True, logits_to_keep=1)
    result = {"kv_cache_bytes": cache_bytes(kv_cache)}
    if cuda:
        torch.cuda.synchronize(model.device)
        result["allocated_bytes"] = torch.cuda.memory_allocated(model.device) - before
    del out
    return result
