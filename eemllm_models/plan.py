"""EfficiencyPlan: one visual-token mode and one visual-token keep fraction per decoder layer, with where
it came from."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .files import atomic_write_text

MODES = ("full", "frozen", "naavit", "composite")
"""Layer modes for visual tokens (text tokens always run in full):

- ``full``: the original layer.
- ``frozen`` (ShortV): visual hidden states pass through unchanged; their keys and values are
  still computed with this layer's weights so text attends to them as before.
- ``naavit`` (SAISA's No Attention Among Visual Tokens): a visual query attends to no other
  visual token, only to itself and to the non-visual tokens before it; the MLP still runs.
- ``composite`` (EE-MLLM-F, our reading): visual tokens form no queries; their update is
  ``o_proj(v_proj(input_norm(x)))`` (self-only attention) followed by the residual and the MLP.
"""

VISUAL_RANKINGS = ("attention", "stride")
"""How the visual tokens to keep are chosen where ``visual_keep`` drops (see :mod:`eemllm_models.withdrawal`):

- ``attention`` (FastV): the attention mass the last prompt position gives each visual token at the
  layer before, averaged over heads; the most attended are kept.
- ``stride``: evenly spaced visual tokens in token order (a fixed spatial stride), as a control.
"""

# ShortV (arXiv 2504.00502) published frozen layers, in the paper's order (lowest LC first).
SHORTV_PRESETS: dict[str, tuple[int, tuple[int, ...]]] = {
    "llava-1.5-7b": (32, (31, 29, 30, 28, 0, 26, 27, 25, 24, 22, 23, 21, 2, 3, 20, 18, 17, 12, 19)),
    "llava-1.5-13b": (40, (39, 32, 28, 36, 27, 37, 29, 30, 1, 38, 25, 31, 2, 26, 23, 34, 0, 33, 35, 22, 24, 21,
                           20, 17)),
    "llava-next-7b": (32, (31, 29, 30, 28, 26, 27, 22, 24, 21, 23, 25, 20, 19, 17, 18, 15, 12, 0, 2)),
    "llava-next-13b": (40, (39, 32, 29, 36, 27, 30, 37, 23, 25, 31, 26, 2, 28, 22, 33, 35, 34, 24, 38, 21, 20,
                            18, 1, 17)),
}


def n_decoder_layers(model) -> int:
    """Number of decoder layers of a loaded HF multimodal model."""
    from .families import family_of

    return len(family_of(model).decoder_layers(model))


@dataclass(frozen=True)
class EfficiencyPlan:
    """One mode per decoder layer (``modes[i]`` for layer ``i``), the fraction of visual tokens each
    layer keeps (``visual_keep[i]``), and its provenance.

    ``visual_keep``: one fraction in [0, 1] per layer, non-increasing with depth, 1.0 for the first
    layer (default: all 1.0, every token stays). Where it drops, the visual tokens are ranked by
    ``visual_ranking`` (one of :data:`VISUAL_RANKINGS`) and the lowest-ranked leave the sequence for
    that layer and every later one (:mod:`eemllm_models.withdrawal`); 0 withdraws them all (VTW).
    Layer modes apply to the visual tokens that remain.

    Provenance is free-form JSON data: model name, probe, policy, date, ... Validated on
    construction (known modes, at least one layer, keep fractions) and against a model when applied.
    """

    modes: list[str]
    provenance: Mapping[str, Any] = field(default_factory=dict)
    visual_keep: list[float] | None = None
    visual_ranking: str = "attention"

    def __post_init__(self) -> None:
        object.__setattr__(self, "modes", list(self.modes))
        object.__setattr__(self, "provenance", dict(self.provenance))
        if not self.modes:
            raise ValueError("an EfficiencyPlan needs one mode per decoder layer; got no layers")
        bad = sorted({m for m in self.modes if m not in MODES})
        if bad:
            raise ValueError(f"unknown layer mode(s) {bad}; choose from {list(MODES)}")
        # + 0.0 turns -0.0 (what float arithmetic can give for "none kept") into 0.0, so plans compare and print alike
        keep = [1.0] * len(self.modes) if self.visual_keep is None else [float(k) + 0.0 for k in self.visual_keep]
        object.__setattr__(self, "visual_keep", keep)
        _check_visual_keep(keep, len(self.modes))
        if self.visual_ranking not in VISUAL_RANKINGS:
            raise ValueError(f"unknown visual_ranking {self.visual_ranking!r}; choose from {list(VISUAL_RANKINGS)}")

    @classmethod
    def empty(cls, n_layers: int, **provenance: Any) -> EfficiencyPlan:
        """All ``n_layers`` layers ``full``: reproduces the original model exactly."""
        return cls(("full",) * n_layers, provenance)

    @classmethod
    def from_layers(cls, n_layers: int, layers: Mapping[int, str] | Iterable[int], mode: str = "frozen",
                    **provenance: Any) -> EfficiencyPlan:
        """A plan with ``layers`` (indices, or a ``{layer: mode}`` mapping) changed, the rest ``full``."""
        chosen = dict(layers) if isinstance(layers, Mapping) else {int(i): mode for i in layers}
        out_of_range = sorted(i for i in chosen if not 0 <= i < n_layers)
        if out_of_range:
            raise ValueError(f"layer indices {out_of_range} are outside 0..{n_layers - 1}")
        return cls(tuple(chosen.get(i, "full") for i in range(n_layers)), provenance)

    @classmethod
    def withdraw(cls, n_layers: int, from_layer: int, **provenance: Any) -> EfficiencyPlan:
        """VTW: every visual token leaves the sequence from layer ``from_layer`` on (``visual_keep`` 0 there)."""
        return cls.prune_tokens(n_layers, from_layer, 0.0, **provenance)

    @classmethod
    def prune_tokens(cls, n_layers: int, from_layer: int, keep: float, ranking: str = "attention",
                     **provenance: Any) -> EfficiencyPlan:
        """FastV: from layer ``from_layer`` on, only the fraction ``keep`` of each sequence's visual tokens
        stays, chosen by ``ranking`` (:data:`VISUAL_RANKINGS`) at the layer before."""
        if not 1 <= from_layer < n_layers:
            raise ValueError(f"from_layer must be in 1..{n_layers - 1} (tokens are ranked at the layer before "
                             f"the first that removes them), got {from_layer}")
        visual_keep = [1.0] * from_layer + [float(keep)] * (n_layers - from_layer)
        return cls(("full",) * n_layers, provenance, visual_keep, ranking)

    @classmethod
    def uniform(cls, model, mode: str, **provenance: Any) -> EfficiencyPlan:
        """Every decoder layer of ``model`` (a loaded HF model, or a layer count) in ``mode``."""
        n_layers = model if isinstance(model, int) else n_decoder_layers(model)
        return cls((mode,) * n_layers, provenance)

    @classmethod
    def preset(cls, name: str) -> EfficiencyPlan:
        """A published plan, e.g. ``"shortv:llava-1.5-7b"`` (ShortV's frozen layers)."""
        method, _, model = name.partition(":")
        if method != "shortv" or model not in SHORTV_PRESETS:
            known = ", ".join(f"shortv:{m}" for m in SHORTV_PRESETS)
            raise ValueError(f"unknown preset {name!r}; known presets: {known}")
        n_layers, layers = SHORTV_PRESETS[model]
        return cls.from_layers(n_layers, layers, "frozen", model=model, policy="shortv-paper",
                               source="ShortV (arXiv 2504.00502), published frozen layers")

    @classmethod
    def resolve(cls, spec: str | os.PathLike) -> EfficiencyPlan:
        """A plan named by ``spec``: a plan JSON file, or else a preset name (``shortv:llava-1.5-7b``).

        A ``spec`` that looks like a file (ends with ``.json`` or holds a path separator) and does not
        exist raises ``FileNotFoundError`` naming the path and the known presets.
        """
        path = Path(spec).expanduser()
        if path.is_file():
            return cls.load(path)
        text = str(spec)
        if text.lower().endswith(".json") or os.sep in text or "/" in text:
            known = ", ".join(f"shortv:{m}" for m in SHORTV_PRESETS)
            what = "a folder, not a plan file" if path.is_dir() else "no such file"
            raise FileNotFoundError(f"no plan file at {text} ({what}); give the path of a plan JSON file "
                                    f"(written by EfficiencyPlan.save or `eemllm plan`) or a preset; "
                                    f"known presets: {known}")
        return cls.preset(text)

    @property
    def n_layers(self) -> int:
        return len(self.modes)

    def layers(self, mode: str) -> tuple[int, ...]:
        """Indices of the layers that run ``mode``."""
        return tuple(i for i, m in enumerate(self.modes) if m == mode)

    @property
    def is_empty(self) -> bool:
        """True when every layer runs ``full`` and keeps every visual token."""
        return all(m == "full" for m in self.modes) and not self.withdraws

    @property
    def withdraws(self) -> bool:
        """True when some layer keeps fewer than all visual tokens."""
        return any(k < 1.0 for k in self.visual_keep)

    def keep_stages(self) -> tuple[tuple[int, float], ...]:
        """``(layer, keep)`` for each layer where ``visual_keep`` drops: where tokens are ranked and removed."""
        keep = self.visual_keep
        return tuple((i, keep[i]) for i in range(self.n_layers) if keep[i] < (keep[i - 1] if i else 1.0))

    def with_provenance(self, **provenance: Any) -> EfficiencyPlan:
        """The same modes with ``provenance`` entries added."""
        return replace(self, provenance={**self.provenance, **provenance})

    def with_visual_keep(self, visual_keep: Iterable[float], ranking: str | None = None) -> EfficiencyPlan:
        """The same modes and provenance with ``visual_keep`` (and ``ranking``, default this plan's)."""
        return replace(self, visual_keep=list(visual_keep),
                       visual_ranking=self.visual_ranking if ranking is None else ranking)

    def check_layers(self, n_layers: int, model_name: str = "the model") -> None:
        """Raise unless this plan has exactly ``n_layers`` layers."""
        if self.n_layers != n_layers:
            raise ValueError(
                f"the plan has {self.n_layers} layers but {model_name} has {n_layers} decoder layers; "
                "make the plan for this model (EfficiencyPlan.from_layers(n_layers, ...))"
            )

    def applied(self, model, implementation: str = "fast"):
        """Apply this plan to ``model`` for a ``with`` block: ``with plan.applied(model): ...``."""
        from .apply import apply_plan

        return apply_plan(model, self, implementation)

    def to_dict(self) -> dict[str, Any]:
        """JSON data: ``modes`` and ``provenance``, plus ``visual_keep`` and ``visual_ranking`` when the
        plan withdraws tokens (a plan that keeps them all writes what older versions wrote)."""
        data: dict[str, Any] = {"modes": list(self.modes), "provenance": dict(self.provenance)}
        if self.withdraws:
            data.update(visual_keep=list(self.visual_keep), visual_ranking=self.visual_ranking)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EfficiencyPlan:
        """The plan of :meth:`to_dict`'s data; data without ``visual_keep`` (older plans) keeps every token."""
        if "modes" not in data:
            raise ValueError("an EfficiencyPlan dict needs a 'modes' list (one mode per layer)")
        return cls(tuple(data["modes"]), data.get("provenance", {}), data.get("visual_keep"),
                   data.get("visual_ranking", "attention"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> EfficiencyPlan:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan as JSON (atomically), stamping ``saved_at`` into its provenance."""
        stamped = self.with_provenance(saved_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        return atomic_write_text(path, stamped.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> EfficiencyPlan:
        """Read a plan JSON file; ``ValueError`` names the file and what is wrong with it."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"plan file {path} is not valid JSON ({err.msg} at line {err.lineno}, column "
                             f"{err.colno}); fix it, or write it again with EfficiencyPlan.save / `eemllm plan`"
                             ) from err
        except UnicodeDecodeError as err:
            raise ValueError(f"plan file {path} is not a text file ({err.reason}); give a plan JSON file") from err
        if not isinstance(data, Mapping):
            raise ValueError(f"plan file {path} holds a JSON {type(data).__name__}, not a plan object with a "
                             "'modes' list; write it again with EfficiencyPlan.save / `eemllm plan`")
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as err:
            raise ValueError(f"plan file {path} is not a valid plan: {err}") from err


def _check_visual_keep(keep: list[float], n_layers: int) -> None:
    """Raise ``ValueError`` saying what to change unless ``keep`` is a valid ``visual_keep`` for ``n_layers``."""
    if len(keep) != n_layers:
        raise ValueError(f"visual_keep has {len(keep)} fractions but the plan has {n_layers} layers; give one "
                         "fraction per decoder layer (1.0 keeps every visual token)")
    outside = [(i, k) for i, k in enumerate(keep) if not (math.isfinite(k) and 0.0 <= k <= 1.0)]
    if outside:
        raise ValueError(f"visual_keep fractions must lie in [0, 1]; got {outside[:3]} as (layer, fraction): "
                         "use 1.0 to keep every visual token, 0.0 to withdraw them all")
    if keep[0] != 1.0:
        raise ValueError(f"visual_keep[0] must be 1.0, got {keep[0]}: tokens are ranked at the layer before the "
                         "first that removes them, so remove them from layer 1 or later")
    rising = [i for i in range(1, n_layers) if keep[i] > keep[i - 1]]
    if rising:
        i = rising[0]
        raise ValueError(f"visual_keep must not increase with depth: layer {i} keeps {keep[i]} after layer "
                         f"{i - 1} kept {keep[i - 1]}, but removed tokens cannot come back; make it non-increasing "
                         f"(e.g. visual_keep[{i}] = {keep[i - 1]})")
