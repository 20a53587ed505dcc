"""Which positions of a batch are visual tokens, text tokens or padding."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

_VISUAL_TOKEN_FIELDS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")


def visual_token_ids(config: PretrainedConfig) -> tuple[int, ...]:
    """The token ids a model's processor expands into visual positions.

    LLaVA and LLaVA-NeXT (whose image-newline features also sit at image-token positions) use
    ``image_token_id``; the Qwen2-VL family adds ``video_token_id`` (its vision start/end markers
    are ordinary text tokens).
    """
    ids = sorted({int(v) for f in _VISUAL_TOKEN_FIELDS if (v := getattr(config, f, None)) is not None})
    if not ids:
        raise ValueError(
            f"{type(config).__name__} names no image token id (looked for {', '.join(_VISUAL_TOKEN_FIELDS)}); "
            "pass visual_token_ids explicitly for this model"
        )
    return tuple(ids)


@dataclass(frozen=True)
class TokenLayout:
    """Visual/text/padding positions of a batch, found from the model's own image token ids.

    ``visual`` and ``valid`` are ``[batch, seq]`` bool tensors: ``visual`` is True at image-token
    positions, ``valid`` is False at padding (left or right). Text positions are valid and not
    visual. Any number of images per sequence, at any offset, is allowed.
    """

    visual: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def from_input_ids(
        cls,
        input_ids: torch.Tensor,
        token_ids: Sequence[int],
        attention_mask: torch.Tensor | None = None,
    ) -> TokenLayout:
        """Layout of ``input_ids`` ``[batch, seq]`` with visual ``token_ids`` and an optional 0/1 padding mask."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        visual = torch.isin(input_ids, torch.tensor(list(token_ids), device=input_ids.device))
        valid = torch.ones_like(visual) if attention_mask is None else attention_mask.to(torch.bool)
        if valid.shape != visual.shape:
            raise ValueError(f"attention_mask shape {tuple(valid.shape)} differs from input_ids {tuple(visual.shape)}")
        return cls(visual & valid, valid)

    def to(self, device: torch.device) -> TokenLayout:
        """This layout on ``device`` (an asynchronous copy from pinned memory on CUDA)."""
        from .modes import to_device

        return TokenLayout(to_device(self.visual, device), to_device(self.valid, device))

    @property
    def text(self) -> torch.Tensor:
        """``[batch, seq]`` bool: valid positions that are not visual."""
        return self.valid & ~self.visual

    @property
    def n_visual(self) -> torch.Tensor:
        """``[batch]`` number of visual tokens per sequence."""
        return self.visual.sum(-1)

    @property
    def n_text(self) -> torch.Tensor:
        """``[batch]`` number of text tokens per sequence (padding excluded)."""
        return self.text.sum(-1)

    def image_spans(self, row: int) -> list[tuple[int, int]]:
        """``[start, end)`` position ranges of the contiguous visual runs of sequence ``row``."""
        flags = self.visual[row].to(torch.int8)
        edges = torch.diff(flags, prepend=flags.new_zeros(1), append=flags.new_zeros(1))
        starts = (edges == 1).nonzero().flatten().tolist()
        ends = (edges == -1).nonzero().flatten().tolist()
        return list(zip(starts, ends))
