"""One adapter per model family: where the decoder layers live and which tokens are visual."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig, PreTrainedModel

from .layout import visual_token_ids


@dataclass(frozen=True)
class Family:
    """What differs between multimodal families; everything else in eemllm is family-agnostic.

    ``language_model``: the attribute of ``model.model`` that holds the language model (its
    ``layers`` and final ``norm``): ``language_model`` for most families, ``text_model`` for
    Idefics3 and SmolVLM.
    """

    name: str
    model_types: tuple[str, ...]
    notes: str
    language_model: str = "language_model"

    def language_model_of(self, model: PreTrainedModel) -> torch.nn.Module:
        """The language model inside ``model`` (``model.model.<language_model>``)."""
        inner = getattr(model, "model", None)
        language_model = getattr(inner, self.language_model, None)
        if not isinstance(language_model, torch.nn.Module):
            raise ValueError(f"could not find the language model of {type(model).__name__} "
                             f"(expected model.model.{self.language_model})")
        return language_model

    def decoder_layers(self, model: PreTrainedModel) -> torch.nn.ModuleList:
        """The language model's decoder layers (``model.model.<language_model>.layers`` in transformers 5)."""
        layers = getattr(self.language_model_of(model), "layers", None)
        if not isinstance(layers, torch.nn.ModuleList):
            raise ValueError(f"could not find the decoder layers of {type(model).__name__} "
                             f"(expected model.model.{self.language_model}.layers)")
        return layers

    def visual_token_ids(self, config: PretrainedConfig) -> tuple[int, ...]:
        return visual_token_ids(config)

    def readout(self, model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[..., vocab]`` from last-layer hidden states ``[..., hidden]``: the final
        norm, lm_head and, where the config sets ``final_logit_softcapping`` (Gemma), its soft cap."""
        norm = getattr(self.language_model_of(model), "norm", None)
        if norm is None:
            raise ValueError(f"could not find the final norm of {type(model).__name__} "
                             f"(expected model.model.{self.language_model}.norm)")
        logits = model.get_output_embeddings()(norm(hidden))
        cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap


FAMILIES = (
    Family("llava", ("llava",), "LLaVA-1.5: one <image> token per visual feature."),
    Family("llava_next", ("llava_next",), "LLaVA-NeXT (anyres): the image-newline features also sit at "
                                          "<image> token positions."),
    Family("llava_onevision", ("llava_onevision",), "LLaVA-OneVision: images and videos, Qwen2 decoder."),
    Family("qwen2_vl", ("qwen2_vl", "qwen2_5_vl"), "Qwen2-VL / Qwen2.5-VL: GQA, M-RoPE position ids "
                                                   "(recomposed into ordinary cos/sin by the rotary module)."),
    Family("qwen3_vl", ("qwen3_vl",), "Qwen3-VL: the qwen3 decoder style (per-head q/k norms), interleaved "
                                      "M-RoPE, images and videos; its deepstack visual features are added to "
                                      "the visual hidden states after the first layers, outside the layers, so a "
                                      "frozen layer there still gets them (the probes replay that addition)."),
    Family("internvl", ("internvl",), "InternVL: visual = the <IMG_CONTEXT> positions (image_token_id), "
                                      "image_seq_length per tile (the processor's crops and thumbnail of an "
                                      "image, or one video frame); the <img>/</img> around each image or frame are "
                                      "text (their hidden states start from their token embeddings). Qwen2 "
                                      "decoder (llama style) or Qwen3's (qwen3 style)."),
    Family("mistral3", ("mistral3",), "Mistral 3 (Pixtral tower, Mistral decoder): visual = the [IMG] positions "
                                      "(image_token_index), one per 2 x 2 merged patches. [IMG_BREAK] after each "
                                      "row of them and [IMG_END] after the last are NOT visual, although the "
                                      "processor counts them among its image tokens: the model puts image "
                                      "features only at [IMG] positions, so their hidden states come from the "
                                      "token embedding, not the vision tower, and freezing them would freeze "
                                      "text."),
    Family("llava_next_video", ("llava_next_video",), "LLaVA-NeXT-Video: visual = the <image> positions (anyres "
                                                      "images, their image-newline features included, as "
                                                      "LLaVA-NeXT) and the <video> positions (video_token_index: "
                                                      "each frame's features pooled by spatial_pool_stride)."),
    Family("idefics3", ("idefics3",), "Idefics3: Llama decoder at model.model.text_model; visual = the <image> "
                                      "positions (image_token_id), image_seq_len per sub-image (rows x cols crops, "
                                      "then the global image); <fake_token_around_image>, <row_i_col_j>, "
                                      "<global-img> and the newlines between rows are text (token embeddings).",
           language_model="text_model"),
    Family("smolvlm", ("smolvlm",), "SmolVLM: as Idefics3 (Llama decoder at model.model.text_model; visual = "
                                    "the <image> positions of every sub-image; <fake_token_around_image>, "
                                    "<row_i_col_j>, <global-img> are text); a video's frames are laid out as "
                                    "single images, so their features sit at <image> positions too.",
           language_model="text_model"),
    Family("gemma3", ("gemma3",), "Gemma 3: the gemma3 decoder style (sandwich norms, q/k norms, query_pre_attn_scalar, "
                                  "sliding-window and global layers); visual = the image token's positions (the "
                                  "begin/end-of-image tokens are text). Inside an image the model attends "
                                  "bidirectionally (token_type_ids); naavit removes that whole visual x visual block, "
                                  "earlier and later image tokens alike (a visual query keeps the text before it and "
                                  "itself), composite keeps only itself, and frozen leaves the visual rows as they are."),
)
REFUSED = {
    "qwen3_vl_moe": "Qwen3-VL-MoE's sparse mixture-of-experts feed-forward is not checked against the layer modes "
                    "yet (only the dense qwen3_vl is)",
}
"""Model types refused with the reason, rather than run with a recipe that does not fit them."""


def family_of(model: PreTrainedModel) -> Family:
    """The adapter for ``model``'s family, or a clear error naming the supported ones."""
    model_type = getattr(model.config, "model_type", None)
    if model_type in REFUSED:
        raise ValueError(f"eemllm does not support {model_type!r} ({type(model).__name__}) yet: {REFUSED[model_type]}")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = sorted(t for f in FAMILIES for t in f.model_types)
    raise ValueError(f"no eemllm adapter for model type {model_type!r} ({type(model).__name__}); supported model "
                     f"types: {supported}. Add a Family to eemllm_models.families for it")
