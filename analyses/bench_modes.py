"""Prefill time of each layer mode against ``full``, next to its FLOPs ratio, measured side by side.

``python -m analyses.bench_modes [--out results.csv] [--repeats 5]`` runs two models:

* the embedded default model on a batch of shapes-vqa prompts (100 visual tokens each);
* a mid-size random LLaVA (decoder hidden 1024, 24 layers, MLP 2816, 16 heads; a one-layer
  vision tower giving 576 visual tokens) on one prompt of 576 visual + 64 text tokens.

For every plan (all layers ``frozen``, ``naavit``, ``composite``, and an empty plan to show the
toolkit's own overhead) it times ``model(**inputs, logits_to_keep=1)`` (what ``generate()``
runs at prefill) with warm-up and repeats, alternating plans inside each repeat so that every
ratio compares runs made side by side, and prints medians with the FLOPs-ideal speedup.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import pandas as pd
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from eemllm_models import EfficiencyPlan, build_prompt, load_default, load_shapes_vqa, token_layout
from eemllm_models.files import atomic_write
from eemllm_models.machine import describe

from .flops import TokenCounts, flops_ratio

PLANS = ("empty", "frozen", "naavit", "composite")


def mid_size_llava(seed: int = 0) -> tuple[LlavaForConditionalGeneration, dict[str, torch.Tensor]]:
    """A random LLaVA with a 1024-wide, 24-layer decoder and one prompt of 576 visual + 64 text tokens."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                              image_size=336, patch_size=14)
    text = LlamaConfig(vocab_size=32064, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                       num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, image_seq_length=576,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config).eval()
    ids = torch.randint(100, 32000, (1, 64))
    input_ids = torch.cat([ids[:, :5], torch.full((1, 576), 32000), ids[:, 5:]], dim=1)
    return model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                   "pixel_values": torch.randn(1, 3, 336, 336)}


def default_model_batch(n: int = 8) -> tuple[LlavaForConditionalGeneration, dict[str, torch.Tensor]]:
    """The embedded default model and ``n`` padded shapes-vqa test prompts."""
    model, processor = load_default()
    data = load_shapes_vqa("test", n=n)
    inputs = processor(images=list(data["image"]), text=[build_prompt(processor, q) for q in data["question"]],
                       return_tensors="pt", padding=True)
    return model, dict(inputs)


@torch.inference_mode()
def time_plans(name: str, model, inputs, repeats: int, warmup: int = 1) -> pd.DataFrame:
    """Median prefill seconds per plan (plus the unmodified model), interleaved per repeat."""
    n_layers = model.config.get_text_config().num_hidden_layers
    plans = {p: EfficiencyPlan.uniform(n_layers, "full" if p == "empty" else p) for p in PLANS}
    times: dict[str, list[float]] = {"original": [], **{p: [] for p in PLANS}}
    for r in range(warmup + repeats):
        for label in times:
            handle = None if label == "original" else plans[label].applied(model)
            start = time.perf_counter()
            model(**inputs, logits_to_keep=1)
            elapsed = time.perf_counter() - start
            if handle is not None:
                handle.remove()
            if r >= warmup:
                times[label].append(elapsed)
    counts = TokenCounts.from_layout(token_layout(model, inputs["input_ids"], inputs.get("attention_mask")))
    base = statistics.median(times["original"])
    rows = []
    for label, values in times.items():
        plan = plans.get(label, plans["empty"])
        ratio = flops_ratio(model.config, plan, counts)
        median = statistics.median(values)
        rows.append({"model": name, "plan": label, "flops_ratio": ratio, "ideal_speedup": 1 / ratio,
                     "median_ms": 1000 * median, "spread_ms": 1000 * (max(values) - min(values)),
                     "speedup": base / median, "of_ideal": (base / median) * ratio,
                     "visual": counts.visual, "text": counts.text, "batch": inputs["input_ids"].shape[0]})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="CSV file for the results")
    args = parser.parse_args()
    frames = [time_plans("default (embedded)", *default_model_batch(), args.repeats),
              time_plans("mid-size random (h1024, 24 layers)", *mid_size_llava(), args.repeats)]
    table = pd.concat(frames, ignore_index=True)
    print(f"{describe()}, fp32")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    if args.out is not None:
        atomic_write(args.out, lambda tmp: table.to_csv(tmp, index=False))


if __name__ == "__main__":
    main()
