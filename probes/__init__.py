"""eemllm probes: where a multimodal model's visual-token work is redundant, as xarray data.

``layer_contribution`` (ShortV's Layer Contribution per layer and token group), ``mode_contribution``
(the same for one layer run in ``frozen``/``naavit``/``composite``; ``layer_and_mode_contribution`` gives
both from one pass), ``withdrawal_contribution``
(VTW's divergence when visual tokens are withdrawn from a layer on, and FastV's ranking statistics),
``attention_statistics`` (per layer and head); ``save_result``/``open_result``/``to_frame`` for their
files and frames.
"""

from .attention import HEAD_STATISTICS, attention_statistics
from .contribution import (CONTRIBUTION_MODES, GROUPS, layer_and_mode_contribution, layer_contribution,
                           mode_contribution)
from .divergence import DIVERGENCES, divergence
from .results import ResultMismatch, open_result, save_result, to_frame
from .runner import CheckpointMismatch, ProbeInputs
from .withdrawal import withdrawal_contribution

__all__ = [
    "CONTRIBUTION_MODES",
    "DIVERGENCES",
    "GROUPS",
    "HEAD_STATISTICS",
    "CheckpointMismatch",
    "ProbeInputs",
    "ResultMismatch",
    "attention_statistics",
    "divergence",
    "layer_and_mode_contribution",
    "layer_contribution",
    "mode_contribution",
    "open_result",
    "save_result",
    "to_frame",
    "withdrawal_contribution",
]
