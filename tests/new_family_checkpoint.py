"""A tiny random Idefics3 checkpoint saved as a user's would be: weights, config, the real Idefics3Processor
(its PIL image processor, a word-level tokenizer, the Idefics3 chat template), all through save_pretrained.

Nothing is downloaded: the tokenizer is built here with the ``tokenizers`` library (every word of
shapes-vqa and of the chat template, the Idefics3 marker tokens, each newline its own token), so
``eemllm_models.load_model(path)`` and ``eemllm --model path`` load it from disk as they would
``HuggingFaceTB/SmolVLM``-style checkpoints. shapes-vqa's 160 px images are resized to 64 px and split
into 2 x 2 sub-images of 32 px plus the global image; each sub-image is 16 patches pixel-shuffled into
4 ``<image>`` tokens, the count the processor's ``image_seq_len`` lays out.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

from eemllm_models.zoo.build import _vocabulary

# The chat template of HuggingFaceTB's Idefics3 / SmolVLM checkpoints.
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
GRID = 6  # the processor names <row_i_col_j> for i, j up to 6
SPECIALS = ("<pad>", "<unk>", "<|im_start|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>",
            "<global-img>", *(f"<row_{i + 1}_col_{j + 1}>" for i in range(GRID) for j in range(GRID)))
N_LAYERS = 6


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: the specials and markers, ``"\\n"``, and every shapes-vqa and chat-template word."""
    words = sorted(set(_vocabulary()) | {"User", "Assistant"})
    vocab = {token: i for i, token in enumerate([*SPECIALS, "\n", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS])
    tokenizer.add_tokens([AddedToken("\n", normalized=False)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<|im_start|>", eos_token="<end_of_utterance>", padding_side="left",
                                   model_max_length=2048)


def build_idefics3(seed: int = 0) -> tuple[Idefics3ForConditionalGeneration, Idefics3Processor]:
    """The random model (SigLIP-style tower, pixel-shuffle connector, a 6-layer Llama decoder at
    ``model.model.text_model``) and its real processor."""
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id}
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, **ids)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    config = Idefics3Config(vision_config=vision, text_config=text, scale_factor=2,
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"), **ids)
    model = Idefics3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # image features about as large as token embeddings (see tests/tiny_models.py)
        model.model.connector.modality_projection.proj.weight.mul_(0.1)
    model.generation_config.update(**ids)
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    processor = Idefics3Processor(image_processor, tokenizer, image_seq_len=model.model.image_seq_len,
                                  chat_template=CHAT_TEMPLATE)
    return model, processor


def save_idefics3_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Save :func:`build_idefics3`'s model and processor to ``path`` with ``save_pretrained`` (no eemllm helper)."""
    path = Path(path)
    model, processor = build_idefics3(seed)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
