"""Prefill time of each layer mode and plan against ``full``, next to its FLOPs ratio, measured side by side.

Two ways to run it (the same command on CPU and on CUDA):

``python -m analyses.measuring.bench_modes [--repeats 5] [--out DIR]``: the fixed mid-size comparison
(reproducible: fixed seeds and sizes):

* the embedded default model on a batch of 8 shapes-vqa prompts (100 visual tokens each);
* a mid-size random LLaVA (decoder hidden 1024, 24 layers, MLP 2816, 16 heads; a one-layer
  vision tower giving 576 visual tokens) on one prompt of 576 visual + 64 text tokens;
* a mid-size random Gemma 3 (the gemma3 decoder style: hidden 1024, 24 layers, 5 sliding-window
  layers of window 512 to each global one) on one prompt of 2 x 256 visual + 68 text tokens;

each with every layer ``frozen``, ``naavit`` or ``composite``, and an empty plan (the toolkit's
own overhead).

``python -m analyses.measuring.bench_modes --config llava-1.5-7b [--images 4] [--scale 0.25] [--layers 8]``:
a random-weight model with the decoder of a paper model's config (``analyses/measuring/model_configs``;
``--config all`` runs LLaVA-1.5-7B with 1, 4 and 8 images and LLaVA-NeXT-7B), ``--scale``
narrowing it (heads, hidden and MLP sizes times the scale; head size kept) and ``--layers``
making it shallower, for CPUs. The prompt is ``35`` text tokens (LLaVA's system prompt), the
images (576 visual tokens each, ``--images`` of them with 5 text tokens between two images;
LLaVA-NeXT: its 2880 visual tokens, five 576-token tiles in a row), then 29 text tokens. The
vision tower is a one-layer stand-in that yields those tokens (its cost is negligible; the
comparison is the decoder's). Plans: the empty plan, ShortV's published frozen layers
(``EfficiencyPlan.preset("shortv:...")``; on a shallower model the first ``round(k * layers / L)``
distinct layers of the paper's order mapped to ``l * layers // L``), every layer ``naavit``, every
layer ``composite`` and VTW's withdrawal of every visual token from the middle layer on
(``EfficiencyPlan.withdraw(layers, layers // 2)``).

``--new-tokens N`` (N >= 2) times decoding as well: each run is then
:func:`analyses.measuring.latency.time_greedy` (the prefill into a fresh ``DynamicCache``, then ``N - 1``
greedy one-token steps with it, wall clock), and the table adds the median decode time, the decode
speedup and the KV-cache size after the last step (analytic, :func:`analyses.measuring.memory.kv_cache_bytes`,
which the cache's own tensors equal: ``tests/test_withdrawal_flops.py``).

What is timed: ``model(**inputs, logits_to_keep=1)`` (the prefill step of ``generate()``) under
``torch.inference_mode``, fp32 on CPU and bf16 on CUDA (``--dtype`` to change), with warm-up
rounds and repeats; inside each round every plan runs once, one after the other, so every ratio
compares runs made side by side. CPU: ``time.perf_counter`` (``--clock cpu``: this process's CPU
time, less disturbed by other processes on a shared machine); CUDA: CUDA events. Printed per plan:
the analytic decoder FLOPs ratio (``analyses.measuring.flops.flops_ratio``) and its ideal speedup, the
median time, the measured speedup and its share of the ideal, the baseline's achieved TFLOP/s
(decoder FLOPs / median time) beside a measured matmul peak of the device, and the peak memory of
a run (CUDA; NaN on CPU). ``--out DIR`` writes ``bench_modes.csv`` and ``bench_modes.json``.

On CPU, fresh memory is part of what is timed: glibc returns freed buffers of a few MB to the
system and page faults on the next ones, which costs much more in some VMs than on bare metal.
``MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=100000000000`` in the environment keeps
that memory in the process, so the timings show compute.

``--profile PLAN`` (``original``, ``empty``, ``frozen``/the ShortV preset, ``naavit``, ``composite``)
instead runs ``torch.profiler`` over one prefill of the last model with that plan, after a warm-up,
and prints the operators that took the most time (self time; CUDA time on CUDA).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pandas as pd
import torch
from transformers import (
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipVisionConfig,
)

from eemllm_models import EfficiencyPlan, apply_plan, build_prompt, load_default, load_shapes_vqa, token_layout
from eemllm_models.files import atomic_write, atomic_write_text
from eemllm_models.machine import describe

from analyses.measuring.flops import TokenCounts, flops_ratio, load_config, plan_flops
from analyses.measuring.latency import time_greedy
from analyses.measuring.memory import kv_cache_bytes

LEGACY_MODES = ("frozen", "naavit", "composite")
IMAGE_TOKEN = 32000
TOKENS_PER_IMAGE = 576
TEXT_BEFORE, TEXT_BETWEEN, TEXT_AFTER = 35, 5, 29
CASES = {  # --config all: (config, images); llava-next's 2880 visual tokens are 5 tiles of 576
    "llava-1.5-7b": ("llava-1.5-7b", 1),
    "llava-1.5-7b-4img": ("llava-1.5-7b", 4),
    "llava-1.5-7b-8img": ("llava-1.5-7b", 8),
    "llava-next-7b": ("llava-next-7b", 1),
}
COLUMNS = ("model", "plan", "flops_ratio", "ideal_speedup", "median_ms", "spread_ms", "speedup", "of_ideal",
           "decode_ms", "decode_speedup", "kv_cache_mb", "base_tflops", "peak_tflops", "peak_memory_gb", "visual",
           "text", "batch", "layers", "hidden", "dtype", "device", "clock", "new_tokens")


def mid_size_llava(seed: int = 0) -> tuple[LlavaForConditionalGeneration, dict[str, torch.Tensor]]:
    """A random LLaVA with a 1024-wide, 24-layer decoder and one prompt of 576 visual + 64 text tokens."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                              image_size=336, patch_size=14)
    text = LlamaConfig(vocab_size=32064, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                       num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, image_seq_length=576,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config).eval()
    ids = torch.randint(100, 32000, (1, 64))
    input_ids = torch.cat([ids[:, :5], torch.full((1, 576), IMAGE_TOKEN), ids[:, 5:]], dim=1)
    return model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                   "pixel_values": torch.randn(1, 3, 336, 336)}


def mid_size_gemma3(seed: int = 0) -> tuple[Gemma3ForConditionalGeneration, dict[str, torch.Tensor]]:
    """A random Gemma 3 with a 1024-wide, 24-layer decoder (8 heads of 128, 4 key/value heads, MLP 2816;
    five sliding-window layers of window 512 to each global one) and one prompt of two images of 256
    visual tokens each (attended bidirectionally inside each image) + 64 text tokens."""
    torch.manual_seed(seed)
    pattern = ["sliding_attention"] * 5 + ["full_attention"]
    text = Gemma3TextConfig(vocab_size=32064, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=128, query_pre_attn_scalar=128,
                            sliding_window=512, layer_types=pattern * 4, max_position_embeddings=2048)
    vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                image_size=64, patch_size=4)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=256,
                          image_token_index=IMAGE_TOKEN, boi_token_index=IMAGE_TOKEN + 1,
                          eoi_token_index=IMAGE_TOKEN + 2)
    model = Gemma3ForConditionalGeneration(config).eval()
    ids = torch.randint(100, 32000, (1, 64))
    image = [IMAGE_TOKEN + 1, *[IMAGE_TOKEN] * 256, IMAGE_TOKEN + 2]
    input_ids = torch.cat([ids[:, :5], torch.tensor([image]), ids[:, 5:10], torch.tensor([image]), ids[:, 10:]], 1)
    return model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                   "token_type_ids": (input_ids == IMAGE_TOKEN).long(), "pixel_values": torch.randn(2, 3, 64, 64)}


def default_model_batch(n: int = 8) -> tuple[LlavaForConditionalGeneration, dict[str, torch.Tensor]]:
    """The embedded default model and ``n`` padded shapes-vqa test prompts."""
    model, processor = load_default()
    data = load_shapes_vqa("test", n=n)
    inputs = processor(images=list(data["image"]), text=[build_prompt(processor, q) for q in data["question"]],
                       return_tensors="pt", padding=True)
    return model, dict(inputs)


def scaled_llava_config(name: str, scale: float = 1.0, layers: int | None = None) -> LlavaConfig:
    """A LLaVA-1.5 config with the decoder of paper model ``name`` (``analyses/measuring/model_configs``), narrowed
    by ``scale`` (heads, hidden and MLP sizes; the head size is kept) and cut to ``layers`` layers,
    and a one-layer 336 px / 14 px CLIP stand-in tower of width 64 (576 visual tokens per image)."""
    text = copy.deepcopy(load_config(name).get_text_config())
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    heads = max(1, round(text.num_attention_heads * scale))
    kv_heads = max(1, round(text.num_key_value_heads * scale))
    if heads % kv_heads:
        raise ValueError(f"--scale {scale} gives {heads} heads and {kv_heads} key/value heads, which do not divide; "
                         "pick a scale that keeps their ratio (e.g. 0.25, 0.5)")
    text.num_attention_heads, text.num_key_value_heads, text.head_dim = heads, kv_heads, head_dim
    text.hidden_size = heads * head_dim
    text.intermediate_size = max(64, round(text.intermediate_size * scale / 64) * 64)
    text.num_hidden_layers = layers or text.num_hidden_layers
    text.max_position_embeddings = max(text.max_position_embeddings, 8192)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                              image_size=336, patch_size=14)
    return LlavaConfig(vision_config=vision, text_config=text.to_dict(), image_token_id=IMAGE_TOKEN,
                       image_seq_length=TOKENS_PER_IMAGE, vision_feature_layer=-1,
                       vision_feature_select_strategy="default")


def paper_prompt(images: int, tiles: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """One prompt: 35 text tokens, ``images`` images of ``tiles`` x 576 visual tokens (5 text tokens
    between two images), 29 text tokens; with the tower's ``pixel_values`` (one per tile)."""
    g = torch.Generator().manual_seed(seed)

    def text(n: int) -> list[int]:
        return torch.randint(100, IMAGE_TOKEN, (n,), generator=g).tolist()

    ids = [1, *text(TEXT_BEFORE - 1)]
    for i in range(images):
        ids += ([] if i == 0 else text(TEXT_BETWEEN)) + [IMAGE_TOKEN] * (tiles * TOKENS_PER_IMAGE)
    ids += text(TEXT_AFTER)
    input_ids = torch.tensor([ids])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "pixel_values": torch.randn(images * tiles, 3, 336, 336, generator=g)}


def scaled_preset(name: str, n_layers: int) -> EfficiencyPlan:
    """ShortV's published plan ``name`` (e.g. ``shortv:llava-1.5-7b``) for a model of ``n_layers`` layers:
    the plan itself at full depth; shallower, the first ``round(k * n_layers / L)`` distinct layers of
    the paper's order (lowest Layer Contribution first) mapped to ``l * n_layers // L``."""
    plan = EfficiencyPlan.preset(name)
    if n_layers == plan.n_layers:
        return plan
    from eemllm_models.plan import SHORTV_PRESETS

    total, order = SHORTV_PRESETS[name.partition(":")[2]]
    wanted = round(len(order) * n_layers / total)
    chosen: list[int] = []
    for layer in order:
        mapped = layer * n_layers // total
        if mapped not in chosen and len(chosen) < wanted:
            chosen.append(mapped)
    return EfficiencyPlan.from_layers(n_layers, chosen, "frozen", **plan.provenance, scaled_to_layers=n_layers)


def paper_case(name: str, images: int, scale: float, layers: int | None, device: torch.device,
               dtype: torch.dtype, seed: int = 0):
    """The model, inputs and plans of one ``--config`` case (see the module docstring)."""
    config = scaled_llava_config(name, scale, layers)
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build the weights in their dtype, on the device: no full-size fp32 copy
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    model.set_attn_implementation("sdpa")
    tiles = 5 if load_config(name).model_type == "llava_next" else 1
    inputs = {k: v.to(device) for k, v in paper_prompt(images, tiles, seed).items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    n_layers = config.text_config.num_hidden_layers
    preset = f"shortv:{name}"
    plans = {"empty": EfficiencyPlan.empty(n_layers), preset: scaled_preset(preset, n_layers),
             "naavit": EfficiencyPlan.uniform(n_layers, "naavit"),
             "composite": EfficiencyPlan.uniform(n_layers, "composite"),
             "vtw-middle": EfficiencyPlan.withdraw(n_layers, n_layers // 2)}
    label = (f"{name}{f' x{images} images' if images > 1 else ''} (h{config.text_config.hidden_size}, "
             f"{n_layers} layers, random)")
    return label, model, inputs, plans


def _timer(device: torch.device, clock: str) -> Callable[[Callable[[], object]], float]:
    """A function that runs ``fn`` once and returns its seconds (CUDA events on CUDA)."""
    if device.type == "cuda":
        def cuda_time(fn) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000
        return cuda_time
    now = time.process_time if clock == "cpu" else time.perf_counter

    def cpu_time(fn) -> float:
        begin = now()
        fn()
        return now() - begin
    return cpu_time


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Best TFLOP/s of a square matrix product on ``device`` in ``dtype`` (8192 on CUDA, 1024 on CPU)."""
    size = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    timer = _timer(device, "wall")
    best = min(timer(lambda: a @ b) for _ in range(5))
    return 2 * size**3 / best / 1e12


@torch.inference_mode()
def time_plans(name: str, model, inputs: Mapping[str, torch.Tensor], plans: Mapping[str, EfficiencyPlan],
               repeats: int, warmup: int = 1, clock: str = "wall", naavit_kernel: str | Mapping[str, str] = "auto",
               peak_tflops: float = float("nan"), new_tokens: int = 1) -> pd.DataFrame:
    """Median prefill seconds per plan (and of the unmodified model, the baseline), interleaved per round.

    ``naavit_kernel``: one kernel for every plan, or one per plan label (``auto`` for those not named).
    ``new_tokens`` >= 2: each run is :func:`~analyses.measuring.latency.time_greedy` instead of one prefill
    forward, timing the prefill and ``new_tokens - 1`` decoding steps (wall clock or CUDA events).
    Returns one row per plan with the columns of :data:`COLUMNS` (the decode ones NaN without decoding).
    """
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be at least 1 (1: prefill only), got {new_tokens}")
    kernels = {label: naavit_kernel if isinstance(naavit_kernel, str) else naavit_kernel.get(label, "auto")
               for label in plans}
    device = next(model.parameters()).device
    timer = _timer(device, clock)
    times: dict[str, list[float]] = {"original": [], **{p: [] for p in plans}}
    decode_times: dict[str, list[float]] = {label: [] for label in times}
    memory: dict[str, float] = {label: float("nan") for label in times}
    for r in range(warmup + repeats):
        for label in times:
            handle = None if label == "original" else apply_plan(model, plans[label], naavit_kernel=kernels[label])
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            if new_tokens > 1:
                elapsed, decoding = time_greedy(model, inputs, new_tokens)
            else:
                elapsed, decoding = timer(lambda: model(**inputs, logits_to_keep=1)), float("nan")
            if device.type == "cuda":
                memory[label] = torch.cuda.max_memory_allocated(device) / 1e9
            if handle is not None:
                handle.remove()
            if r >= warmup:
                times[label].append(elapsed)
                decode_times[label].append(decoding)
    counts = TokenCounts.from_layout(token_layout(model, inputs["input_ids"], inputs.get("attention_mask")))
    text = model.config.get_text_config()
    empty = EfficiencyPlan.empty(text.num_hidden_layers)
    base, base_decode = statistics.median(times["original"]), statistics.median(decode_times["original"])
    batch = inputs["input_ids"].shape[0]
    base_flops = float(plan_flops(model.config, empty, counts).flops.sum()) * inputs["input_ids"].shape[0]
    base_tflops = base_flops / base / 1e12
    rows = []
    for label, values in times.items():
        ratio = flops_ratio(model.config, plans.get(label, empty), counts)
        median, decode = statistics.median(values), statistics.median(decode_times[label])
        kv_bytes = kv_cache_bytes(model.config, plans.get(label, empty), counts, decoded=new_tokens - 1,
                                  dtype=next(model.parameters()).dtype, batch=batch)
        rows.append({"model": name, "plan": label, "flops_ratio": ratio, "ideal_speedup": 1 / ratio,
                     "median_ms": 1000 * median, "spread_ms": 1000 * (max(values) - min(values)),
                     "speedup": base / median, "of_ideal": (base / median) * ratio, "decode_ms": 1000 * decode,
                     "decode_speedup": base_decode / decode, "kv_cache_mb": kv_bytes / 2**20,
                     "base_tflops": base_tflops,
                     "peak_tflops": peak_tflops, "peak_memory_gb": memory[label], "visual": counts.visual,
                     "text": counts.text, "batch": inputs["input_ids"].shape[0], "layers": text.num_hidden_layers,
                     "hidden": text.hidden_size, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                     "device": device.type, "new_tokens": new_tokens,
                     "clock": "cuda-events" if device.type == "cuda" else "wall" if new_tokens > 1 else clock})
    return pd.DataFrame(rows, columns=list(COLUMNS))


def profile_plan(model, inputs: Mapping[str, torch.Tensor], plan: EfficiencyPlan | None, naavit_kernel: str = "auto",
                 rows: int = 15) -> str:
    """``torch.profiler``'s table of the ``rows`` most expensive operators of one prefill under ``plan``
    (None: the unmodified model), after one untimed warm-up prefill."""
    from torch.profiler import ProfilerActivity, profile

    device = next(model.parameters()).device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    handle = None if plan is None else apply_plan(model, plan, naavit_kernel=naavit_kernel)
    try:
        with torch.inference_mode():
            model(**inputs, logits_to_keep=1)
            with profile(activities=activities) as prof:
                model(**inputs, logits_to_keep=1)
                if device.type == "cuda":
                    torch.cuda.synchronize()
    finally:
        if handle is not None:
            handle.remove()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def legacy_plans(model) -> dict[str, EfficiencyPlan]:
    """The fixed comparison's plans: the empty plan and every layer in each mode."""
    n_layers = model.config.get_text_config().num_hidden_layers
    return {"empty": EfficiencyPlan.empty(n_layers), **{m: EfficiencyPlan.uniform(n_layers, m) for m in LEGACY_MODES}}


def write_results(table: pd.DataFrame, out: Path, settings: Mapping[str, object]) -> None:
    """``out/bench_modes.csv`` (the table) and ``out/bench_modes.json`` (settings, machine and rows)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "bench_modes.csv", lambda tmp: table.to_csv(tmp, index=False))
    payload = {"machine": describe(), "settings": dict(settings), "rows": table.to_dict(orient="records")}
    atomic_write_text(out / "bench_modes.json", json.dumps(payload, indent=1, default=str) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None,
                        help=f"a paper model config ({', '.join(sorted({c for c, _ in CASES.values()}))}) or 'all'; "
                             "default: the fixed mid-size comparison")
    parser.add_argument("--images", type=int, default=1, help="images in the prompt (with --config)")
    parser.add_argument("--scale", type=float, default=None,
                        help="width scale of the decoder (default 1 on CUDA, 0.25 on CPU)")
    parser.add_argument("--layers", type=int, default=None, help="decoder depth (default: the config's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                        help="CPU timing clock of prefill-only runs (decoding runs use the wall clock)")
    parser.add_argument("--new-tokens", type=int, default=1,
                        help="tokens to generate per run: 1 times the prefill only; N >= 2 also times N - 1 "
                             "decoding steps")
    parser.add_argument("--naavit-kernel", default="auto", help="naavit attention kernel (auto, gather, flex)")
    parser.add_argument("--out", type=Path, default=None, help="folder for bench_modes.csv and bench_modes.json")
    parser.add_argument("--profile", default=None, metavar="PLAN",
                        help="profile one prefill of the (last) model under PLAN instead of timing every plan")
    args = parser.parse_args(argv)
    if args.new_tokens < 1:
        parser.error(f"--new-tokens must be at least 1 (1: prefill only), got {args.new_tokens}")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.profile is not None:
        *_, (label, model, inputs, plans) = _cases(args, device, dtype)
        if args.profile == "frozen" and "frozen" not in plans:
            plans["frozen"] = next(p for name, p in plans.items() if name.startswith("shortv:"))
        if args.profile not in plans and args.profile != "original":
            raise SystemExit(f"--profile {args.profile!r}: choose from original, {', '.join(plans)}")
        print(f"{describe()}, {str(dtype).removeprefix('torch.')}; {label}, plan {args.profile}")
        print(profile_plan(model, inputs, plans.get(args.profile), args.naavit_kernel))
        return
    peak = matmul_peak_tflops(device, dtype)
    timing = dict(repeats=args.repeats, warmup=args.warmup, clock=args.clock, naavit_kernel=args.naavit_kernel,
                  peak_tflops=peak, new_tokens=args.new_tokens)
    frames = []
    for label, model, inputs, plans in _cases(args, device, dtype):
        frames.append(time_plans(label, model, inputs, plans, **timing))
        del model
    table = pd.concat(frames, ignore_index=True)
    print(f"{describe()}, {str(dtype).removeprefix('torch.')}, matmul peak {peak:.2f} TFLOP/s")
    shown = ["model", "plan", "flops_ratio", "ideal_speedup", "median_ms", "spread_ms", "speedup", "of_ideal",
             *(["decode_ms", "decode_speedup", "kv_cache_mb"] if args.new_tokens > 1 else []), "base_tflops",
             "peak_memory_gb"]
    print(table[shown].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    if args.out is not None:
        write_results(table, args.out, {**vars(args), "dtype": str(dtype), "out": str(args.out)})


def _cases(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """``(label, model, inputs, plans)`` of each model the arguments ask for, built one at a time."""
    if args.config is None:
        for label, build in (("default (embedded)", default_model_batch),
                             ("mid-size random (h1024, 24 layers)", mid_size_llava),
                             ("mid-size random Gemma 3 (h1024, 24 layers)", mid_size_gemma3)):
            model, inputs = build()
            yield label, model.to(device, dtype), _to(inputs, device, dtype), legacy_plans(model)
        return
    scale = args.scale or (1.0 if device.type == "cuda" else 0.25)
    for name, images in (list(CASES.values()) if args.config == "all" else [(args.config, args.images)]):
        yield paper_case(name, images, scale, args.layers, device, dtype)


def _to(inputs: Mapping[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``inputs`` on ``device``, floating-point ones in ``dtype``."""
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}


if __name__ == "__main__":
    main()
