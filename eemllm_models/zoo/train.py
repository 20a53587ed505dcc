"""Training recipe of the embedded default model: ``python -m eemllm_models.zoo.train --out DIR``.

Seeded and reproducible for a given thread count. What makes a 5M-parameter LLaVA learn
shapes-vqa in under an hour on two CPU cores:

* **Every question of a scene in one sequence.** A training sequence is a multi-turn
  conversation ``USER: <image>\\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>...`` over all
  seven question types of one scene in random order; the loss covers each answer token and the
  ``</s>`` after it. Attention is causal, so the first turn is exactly the single-turn prompt of
  the benchmark, while the later turns add supervision for the cost of a few text tokens.
* **A dense auxiliary objective** on the vision features that the projector receives: two
  linear heads (dropped after training) predict, for each patch, the content of its grid cell
  (colour-shape pair, character or empty) and the cell's index. It trains the tower and gives
  every visual token a position-aware, object-aware feature long before the LM loss alone would.
* **Guided attention and an early read-out.** Two heads of one early decoder layer are taught
  where to look: at the position that predicts an answer, head 0 should attend to the visual
  tokens of the first grid cell the question is about and head 1 to those of the last (a
  cross-entropy on their attention distribution). For single-hop questions (colour, shape or
  character of one cell) the model's own final norm and ``lm_head`` must also read the answer off
  that layer's output (an early-exit loss). Without these a from-scratch decoder spends the hour
  attending uniformly to the 100 visual tokens and learns only what a uniform average answers
  (counting): a linear probe found the colour of the asked cell perfectly in the visual tokens
  but not at the answer position.
* **Fresh scenes every step** from the train split's seed stream (rendering costs ~2% of a
  step), AdamW with warm-up and cosine decay, gradient clipping, bf16 autocast on CPUs that
  have bf16 instructions.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from ..generation import generate_answers
from ..loading import write_checksums
from ..machine import cpu_name
from . import build, shapes_vqa


SINGLE_HOP = ("color_at", "shape_at", "read")


def _pixel_values(images: np.ndarray) -> torch.Tensor:
    """``[B, 160, 160, 3]`` uint8 -> ``[B, 3, 160, 160]`` normalised exactly as the processor does."""
    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(build.CLIP_MEAN)[:, None, None]
    std = torch.tensor(build.CLIP_STD)[:, None, None]
    return (x - mean) / std


def _patch_cells() -> torch.Tensor:
    """``[100]`` grid-cell index of each patch (by its centre pixel)."""
    n = shapes_vqa.IMAGE_SIZE // build.PATCH_SIZE
    centres = (np.arange(n) + 0.5) * build.PATCH_SIZE
    cell_of = np.minimum((centres // shapes_vqa.CELL).astype(int), shapes_vqa.GRID - 1)
    return torch.from_numpy((cell_of[:, None] * shapes_vqa.GRID + cell_of[None, :]).reshape(-1))


class Encoder:
    """Turns scenes into padded multi-turn training sequences with answer-token labels."""

    def __init__(self, processor: LlavaProcessor, n_image_tokens: int):
        tok = processor.tokenizer
        self.tok = tok
        self.bos, self.eos, self.pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        self.image = tok.convert_tokens_to_ids(build.IMAGE_TOKEN)
        self.n_image_tokens = n_image_tokens
        self.user = tok("USER:", add_special_tokens=False)["input_ids"]
        self.assistant = tok("ASSISTANT:", add_special_tokens=False)["input_ids"]

    def sequence(self, scene: shapes_vqa.Scene, rng: np.random.Generator
                 ) -> tuple[list[int], list[int], list[tuple[int, int, int, int]]]:
        """Token ids, labels (``-100`` where no loss) and attention targets of one conversation.

        A target ``(query_position, first_cell, last_cell, single_hop)`` names the position that
        predicts an answer, the grid cells its question is about (-1: none) and whether one cell
        answers it.
        """
        ids = [self.bos, *self.user, *([self.image] * self.n_image_tokens)]
        labels = [-100] * len(ids)
        targets = []
        for k, qi in enumerate(rng.permutation(len(scene.questions))):
            q = scene.questions[qi]
            prompt = ([] if k == 0 else self.user) + self.tok(q.question, add_special_tokens=False)["input_ids"]
            answer = self.tok(q.answer, add_special_tokens=False)["input_ids"]
            ids += prompt + self.assistant
            cells = (q.cells[0], q.cells[-1]) if q.cells else (-1, -1)
            targets.append((len(ids) - 1, *cells, int(q.qtype in SINGLE_HOP)))
            ids += answer + [self.eos]
            labels += [-100] * (len(prompt) + len(self.assistant)) + answer + [self.eos]
        return ids, labels, targets

    def batch(self, scenes: list[shapes_vqa.Scene], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Right-padded batch: ``input_ids``/``labels``/``attention_mask`` ``[B, T]``, pixels, cell
        labels ``[B, 9]`` and attention targets ``[N, 5]`` rows of ``(batch, query_position, cell, cell,
        single_hop)``."""
        seqs = [self.sequence(s, rng) for s in scenes]
        width = max(len(ids) for ids, _, _ in seqs)
        ids = torch.full((len(seqs), width), self.pad)
        labels = torch.full((len(seqs), width), -100)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for b, (i, l, _) in enumerate(seqs):
            ids[b, : len(i)], labels[b, : len(l)], mask[b, : len(i)] = torch.tensor(i), torch.tensor(l), 1
        return {
            "targets": torch.tensor([(b, *t) for b, (_, _, ts) in enumerate(seqs) for t in ts]),
            "input_ids": ids,
            "labels": labels,
            "attention_mask": mask,
            "pixel_values": _pixel_values(np.stack([s.image for s in scenes])),
            "cells": torch.from_numpy(np.stack([s.cell_labels() for s in scenes])),
        }


class AuxHeads(torch.nn.Module):
    """Per-patch cell-content and cell-index classifiers on the projector's input features."""

    def __init__(self, width: int):
        super().__init__()
        self.content = torch.nn.Linear(width, shapes_vqa.N_CELL_LABELS)
        self.cell = torch.nn.Linear(width, shapes_vqa.GRID * shapes_vqa.GRID)

    def loss(self, features: torch.Tensor, cells: torch.Tensor, patch_cells: torch.Tensor) -> torch.Tensor:
        """features ``[B, P, D]``, cells ``[B, 9]`` content ids, patch_cells ``[P]``."""
        content_target = cells[:, patch_cells]  # [B, P]
        cell_target = patch_cells.expand(features.shape[0], -1)
        content = F.cross_entropy(self.content(features).flatten(0, 1).float(), content_target.flatten())
        cell = F.cross_entropy(self.cell(features).flatten(0, 1).float(), cell_target.flatten())
        return content + cell


class GuidedAttention:
    """Cross-entropy that teaches heads 0 and 1 of decoder layer ``layer`` where to look.

    A forward pre-hook keeps the layer's input; :meth:`loss` recomputes those heads' queries at
    the target positions and their keys, so the model's own attention code is untouched.
    """

    def __init__(self, model: LlavaForConditionalGeneration, layer: int, image_start: int, patch_cells: torch.Tensor):
        self.layer = model.model.language_model.layers[layer]
        self.image_start, self.patch_cells = image_start, patch_cells
        self.inputs: dict[str, torch.Tensor] = {}
        self.handle = self.layer.register_forward_pre_hook(self._keep, with_kwargs=True)

    def _keep(self, module, args, kwargs):
        self.inputs["hidden"] = args[0] if args else kwargs["hidden_states"]
        self.inputs["cos"], self.inputs["sin"] = kwargs["position_embeddings"]

    def loss(self, targets: torch.Tensor) -> torch.Tensor:
        """targets ``[N, 5]``: ``(batch, query_position, cell_head0, cell_head1, single_hop)``; cell -1: none."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        targets = targets[targets[:, 2] >= 0]
        attn = self.layer.self_attn
        x = self.layer.input_layernorm(self.inputs["hidden"])  # [B, T, D]
        b, t = x.shape[:2]
        d = attn.head_dim
        q = attn.q_proj(x).view(b, t, -1, d)[:, :, :2].transpose(1, 2)  # [B, 2, T, d]
        k = attn.k_proj(x).view(b, t, -1, d)[:, :, :2].transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, self.inputs["cos"], self.inputs["sin"])
        rows, pos = targets[:, 0], targets[:, 1]
        scores = torch.einsum("nhd,nhtd->nht", q[rows, :, pos], k[rows]).float() * attn.scaling  # [N, 2, T]
        keys = torch.arange(t)
        scores = scores.masked_fill((keys[None, :] > pos[:, None])[:, None], float("-inf"))
        cell_of_key = torch.full((t,), -1)
        cell_of_key[self.image_start : self.image_start + len(self.patch_cells)] = self.patch_cells
        wanted = cell_of_key[None, None, :] == targets[:, 2:4, None]  # [N, 2, T]
        log_total = scores.logsumexp(-1)
        log_wanted = scores.masked_fill(~wanted, float("-inf")).logsumexp(-1)
        return (log_total - log_wanted).mean()


class EarlyExit:
    """The answer read off decoder layer ``layer``'s output through the model's final norm and ``lm_head``."""

    def __init__(self, model: LlavaForConditionalGeneration, layer: int, single_hop_only: bool):
        self.model, self.single_hop_only = model, single_hop_only
        self.output: dict[str, torch.Tensor] = {}
        self.handle = model.model.language_model.layers[layer].register_forward_hook(
            lambda mod, args, out: self.output.__setitem__("out", out))

    def loss(self, targets: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the answer token at targets ``[N, 5]`` (single-hop ones, or all)."""
        if self.single_hop_only:
            targets = targets[targets[:, 4] == 1]
        rows, pos = targets[:, 0], targets[:, 1]
        hidden = self.model.model.language_model.norm(self.output["out"][rows, pos])
        return F.cross_entropy(self.model.lm_head(hidden).float(), input_ids[rows, pos + 1])


def _lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token loss: logits ``[B, T, V]`` at position t predict ``labels[:, t + 1]``."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def evaluate(model: LlavaForConditionalGeneration, processor: LlavaProcessor, split: str, n: int,
             seed: int = 0, batch_size: int = 32) -> dict[str, float]:
    """Greedy ``generate()`` accuracy per qtype (and ``overall``) on ``n`` rows of ``split``."""
    data = shapes_vqa.load_shapes_vqa(split, n=n, seed=seed)
    model.eval()
    answers = generate_answers(model, processor, data["image"], data["question"], batch_size, progress=False)
    return shapes_vqa.accuracy(data["qtype"], answers, data["answer"])


def train(out: Path, steps: int, batch_size: int = 32, lr: float = 1e-3, aux_weight: float = 1.0,
          guide_weight: float = 1.0, guide_layer: int = 2, seed: int = 0, eval_every: int = 500,
          bf16: bool = True, init_from: Path | None = None, first_scene: int = 0,
          deep_readout_layer: int | None = None) -> dict:
    """Train the default model and save it (safetensors + processor) to ``out``.

    From scratch, or continuing from the model saved in ``init_from`` (a second stage); step
    ``s`` uses train-split scenes ``first_scene + s * batch_size ...``, so a second stage that
    starts where the first stopped sees only new scenes.
    """
    torch.manual_seed(seed)
    if init_from is None:
        model, processor = build.build_untrained(seed)
    else:
        model = LlavaForConditionalGeneration.from_pretrained(init_from)
        processor = LlavaProcessor.from_pretrained(init_from)
    n_image_tokens = model.config.image_seq_length
    encoder = Encoder(processor, n_image_tokens)
    aux = AuxHeads(model.config.vision_config.hidden_size)
    patch_cells = _patch_cells()
    params = [*model.parameters(), *aux.parameters()]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    )
    features: dict[str, torch.Tensor] = {}
    hook = model.model.multi_modal_projector.register_forward_hook(
        lambda mod, args, output: features.__setitem__("x", args[0])
    )
    guide = GuidedAttention(model, guide_layer, image_start=1 + len(encoder.user), patch_cells=patch_cells)
    exits = [EarlyExit(model, guide_layer, single_hop_only=True)]
    if deep_readout_layer is not None:
        exits.append(EarlyExit(model, deep_readout_layer, single_hop_only=False))
    data_rng = np.random.default_rng(seed)
    log: list[dict] = []
    start = time.time()
    model.train()
    bar = tqdm(range(steps), desc="training default model")
    for step in bar:
        first = first_scene + step * batch_size
        scenes = [shapes_vqa.make_scene(shapes_vqa.scene_rng("train", first + j)) for j in range(batch_size)]
        batch = encoder.batch(scenes, data_rng)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                           attention_mask=batch["attention_mask"]).logits
            lm = _lm_loss(logits, batch["labels"])
            aux_loss = aux.loss(features["x"], batch["cells"], patch_cells)
            guide_loss = guide.loss(batch["targets"])
            readout = sum(e.loss(batch["targets"], batch["input_ids"]) for e in exits)
        loss = lm + aux_weight * aux_loss + guide_weight * (guide_loss + readout)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(lm=f"{lm.item():.3f}", aux=f"{aux_loss.item():.3f}", guide=f"{guide_loss.item():.3f}",
                        readout=f"{readout.item():.3f}")
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            acc = evaluate(model, processor, "train", n=210, seed=1)
            model.train()
            entry = {"step": step + 1, "minutes": (time.time() - start) / 60, "lm": lm.item(),
                     "aux": aux_loss.item(), "guide": guide_loss.item(), "readout": readout.item(), "val": acc}
            log.append(entry)
            tqdm.write(json.dumps(entry))
            _save(model, processor, out)
    hook.remove()
    for handle in (guide.handle, *(e.handle for e in exits)):
        handle.remove()
    info = {
        "steps": steps, "batch_size": batch_size, "lr": lr, "aux_weight": aux_weight,
        "guide_weight": guide_weight, "guide_layer": guide_layer, "seed": seed,
        "init_from": None if init_from is None else str(init_from), "first_scene": first_scene,
        "deep_readout_layer": deep_readout_layer,
        "bf16_autocast": bf16, "minutes": (time.time() - start) / 60, "threads": torch.get_num_threads(),
        "machine": f"{cpu_name()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "log": log,
    }
    (out / "training_log.json").write_text(json.dumps(info, indent=1))
    return info


def _save(model: LlavaForConditionalGeneration, processor: LlavaProcessor, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    write_checksums(out)


def write_model_card(out: Path, info: dict) -> None:
    """Write ``out/README.md``: architecture, size, training run and per-type test accuracy."""
    model = LlavaForConditionalGeneration.from_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    size_mb = (out / "model.safetensors").stat().st_size / 1e6
    text, vision = model.config.text_config, model.config.vision_config
    test = info["test"]
    rows = "\n".join(
        f"| `{q}` | {test[q]:.1%} | {shapes_vqa.CHANCE[q]:.1%} |" for q in shapes_vqa.QTYPES
    )
    card = f"""# eemllm default model

A small `LlavaForConditionalGeneration` trained from scratch by eemllm on its generated benchmark
shapes-vqa, so that every eemllm command runs offline, in seconds, on a model whose layers and
visual tokens behave like a real LLaVA's. Load it with `eemllm_models.load_default()` or with
`AutoProcessor.from_pretrained` / `LlavaForConditionalGeneration.from_pretrained` on this folder.

## Architecture

| part | configuration |
| --- | --- |
| vision tower | CLIP, {vision.num_hidden_layers} layers, width {vision.hidden_size}, {vision.image_size} px images, {vision.patch_size} px patches |
| projector | LLaVA's two-layer GELU MLP, {vision.hidden_size} -> {text.hidden_size} |
| decoder | Llama, {text.num_hidden_layers} layers, width {text.hidden_size}, MLP {text.intermediate_size}, {text.num_attention_heads} heads, vocabulary {text.vocab_size} (word-level `tokenizer.json`) |
| visual tokens | {model.config.image_seq_length} per image (CLS dropped, `vision_feature_select_strategy="default"`) |
| prompt | llava-1.5's chat template: `USER: <image>\\n{{question}} ASSISTANT:` |
| parameters | {n_params:,} ({size_mb:.1f} MB of fp32 safetensors) |

## Accuracy on the shapes-vqa test split

Greedy `generate()`, exact match, {info["test_rows"]} rows (seed 0, {info["test_rows"] // len(shapes_vqa.QTYPES)} per type).
Chance is uniform guessing among the answers each question allows.

| question type | accuracy | chance |
| --- | --- | --- |
{rows}
| overall | {test["overall"]:.1%} | |

## Training

`python -m eemllm_models.zoo.train --out DIR` (the recipe is in that module's docstring):
{info["steps"]} steps of {info["batch_size"]} fresh train-split scenes, each a conversation over all
seven question types; a dense auxiliary patch objective on the vision features; guided attention
and an early read-out at decoder layer {info["guide_layer"]}; AdamW, peak learning rate {info["lr"]},
warm-up and cosine decay, bf16 autocast: {info["bf16_autocast"]}, seed {info["seed"]}.
It took {info["minutes"]:.0f} minutes on {info["machine"]} (torch {info["torch"]}).
`training_log.json` holds the validation curve (train-split seed 1).
"""
    weak = [q for q in shapes_vqa.QTYPES if test[q] < shapes_vqa.CHANCE[q] + 0.25]
    if weak:
        card += (f"\n## Limits\n\nStill close to chance (less than 25 points above it): {', '.join(weak)}. "
                 "These need two reasoning steps after the visual look-up; longer training learns them.\n")
    (out / "README.md").write_text(card)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the trained model")
    parser.add_argument("--steps", type=int, default=1400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--no-bf16", dest="bf16", action="store_false",
                        help="train in fp32 (slower where the CPU has bf16 instructions)")
    parser.add_argument("--test-rows", type=int, default=1400, help="test-split rows for the model card")
    parser.add_argument("--init-from", type=Path, default=None, help="continue from the model saved here")
    parser.add_argument("--first-scene", type=int, default=0, help="index of the first train-split scene")
    parser.add_argument("--deep-readout-layer", type=int, default=None,
                        help="also read every answer off this layer's output (early-exit loss)")
    args = parser.parse_args()
    info = train(args.out, args.steps, args.batch_size, args.lr, seed=args.seed, eval_every=args.eval_every,
                 bf16=args.bf16, init_from=args.init_from, first_scene=args.first_scene,
                 deep_readout_layer=args.deep_readout_layer)
    finish(args.out, info, args.test_rows)


def finish(out: Path, info: dict, test_rows: int) -> None:
    """Measure test accuracy of the model saved in ``out``; write its log, model card and checksums."""
    model, processor = LlavaForConditionalGeneration.from_pretrained(out).eval(), LlavaProcessor.from_pretrained(out)
    info["test"] = evaluate(model, processor, "test", n=test_rows)
    info["test_rows"] = test_rows
    (out / "training_log.json").write_text(json.dumps(info, indent=1) + "\n")
    write_model_card(out, info)
    write_checksums(out)
    print(json.dumps(info["test"], indent=1))


if __name__ == "__main__":
    main()
