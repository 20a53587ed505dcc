"""eemllm's model side: loading HF multimodal models, the embedded default model and its benchmark."""

from .apply import AppliedPlan, apply_plan, token_layout
from .generation import build_prompt, generate_answers
from .layout import TokenLayout
from .loading import ModelLoadError, load_model
from .plan import MODES, VISUAL_RANKINGS, EfficiencyPlan
from .pruned import is_pruned, load_checkpoint, load_pruned, save_pruned
from .zoo import default_model_path, load_default, load_zoo
from .zoo.shapes_vqa import load_shapes_vqa

__all__ = [
    "MODES",
    "VISUAL_RANKINGS",
    "AppliedPlan",
    "EfficiencyPlan",
    "TokenLayout",
    "apply_plan",
    "token_layout",
    "ModelLoadError",
    "build_prompt",
    "default_model_path",
    "generate_answers",
    "is_pruned",
    "load_checkpoint",
    "load_default",
    "load_model",
    "load_pruned",
    "load_shapes_vqa",
    "save_pruned",
]
