"""Measured accuracy against FLOPs for the freezing policies and the papers' baselines.

For each ``k``, the ``k`` layers chosen by each policy (``shortv``, ``cosine``, ``random``) have
their visual tokens frozen and the model answers a held-out split; at equal ``k`` they cost the
same FLOPs, so their accuracies compare directly. ``text`` is ShortV's control: the text tokens,
not the visual ones, are frozen in the ``shortv``-chosen layers.

A comparison *chooses* (which policy, which ``k``), so it runs on a selection split (shapes-vqa
``validation``); the chosen plan's final score belongs to a split it never saw (``test``). Pass that
evaluation set as ``evaluation=`` and the rows are checked for overlap (``analyses.choosing.heldout``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import datasets
import numpy as np
import pandas as pd
import torch
import xarray as xr
from tqdm.auto import tqdm
from transformers import PreTrainedModel, ProcessorMixin

from eemllm_models import EfficiencyPlan, token_layout
from eemllm_models.families import family_of
from probes.uncertainty import LEVEL

from analyses.evaluating.accuracy import accuracy_table
from analyses.evaluating.evaluate import answer_frame
from analyses.measuring.flops import DecoderShape, TokenCounts, flops_ratio, layer_flops
from analyses.choosing.heldout import check_disjoint, describe
from analyses.choosing.policies import POLICIES, freeze_plan

COMPARED = (*POLICIES, "text")
"""What :func:`compare_policies` measures: the freezing policies and the frozen-text control."""


@contextmanager
def text_frozen(model: PreTrainedModel, layers: Iterable[int]) -> Iterator[None]:
    """Leave the text tokens' hidden states unchanged in decoder ``layers`` (visual tokens run in full).

    The reference form of ShortV's text-freezing control: each layer runs as usual and its text
    rows are put back to its input; decoded tokens (text) pass these layers unchanged too.
    """
    decoder = family_of(model).decoder_layers(model)
    chosen = sorted(set(layers))
    outside = [i for i in chosen if not 0 <= i < len(decoder)]
    if outside:
        raise ValueError(f"layers {outside} are outside 0..{len(decoder) - 1}")
    text: list[torch.Tensor] = []

    def read_layout(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("freezing text needs input_ids to find the visual tokens; pass input_ids")
        text[:] = [~token_layout(model, input_ids).visual]

    def put_back_text(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        result = output[0] if isinstance(output, tuple) else output
        mixed = torch.where(text[0][..., None], hidden, result)
        return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

    handles = [model.register_forward_pre_hook(read_layout, with_kwargs=True)]
    handles += [decoder[i].register_forward_hook(put_back_text, with_kwargs=True) for i in chosen]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def text_frozen_flops_ratio(config, layers: Iterable[int], tokens: TokenCounts) -> float:
    """Decoder prefill FLOPs with the text tokens frozen in ``layers``, over the original's.

    Freezing text is ``frozen`` with the roles swapped: queries, o_proj and MLP run for the visual
    rows only, keys and values for all.
    """
    shape = DecoderShape.from_config(config)
    swapped = TokenCounts(0, tokens.text, tokens.visual)
    chosen = set(layers)
    full = sum(layer_flops(shape, tokens, "full").values())
    frozen = sum(layer_flops(shape, swapped, "frozen").values())
    return (len(chosen) * frozen + (shape.layers - len(chosen)) * full) / (shape.layers * full)


@dataclass
class HeldOutAccuracy:
    """``plan -> accuracy`` (exact match, 0..1) of ``model`` under a plan on the selection set ``data``.

    Policies that choose by accuracy (``policies.greedy_plan``, ``policies.shortv_within_tolerance``)
    read ``data`` to record the split and the number of questions they chose on.
    """

    model: PreTrainedModel
    processor: ProcessorMixin
    data: datasets.Dataset
    batch_size: int = 16

    def __call__(self, plan: EfficiencyPlan) -> float:
        frame = answer_frame(self.model, self.processor, self.data, plan=plan, batch_size=self.batch_size,
                             progress=False)
        return float(frame.correct.mean())

    def outcomes(self, plan: EfficiencyPlan) -> dict:
        """``accuracy``, ``correct`` (count) and ``outcomes`` (one ``+``/``-`` per question of ``data``, in row
        order: right or wrong) under ``plan``; what the report's paired intervals read."""
        right = answer_frame(self.model, self.processor, self.data, plan=plan, batch_size=self.batch_size,
                             progress=False).correct.to_numpy(dtype=bool)
        return {"accuracy": float(right.mean()), "correct": int(right.sum()),
                "outcomes": "".join("+" if r else "-" for r in right)}

    @property
    def split(self) -> str:
        return str(describe(self.data)["split"])

    @property
    def n(self) -> int:
        return len(self.data)


def accuracy_on(model: PreTrainedModel, processor: ProcessorMixin, data: datasets.Dataset, batch_size: int = 16,
                evaluation: datasets.Dataset | None = None, allow_overlap: bool = False) -> HeldOutAccuracy:
    """A function ``plan -> accuracy`` of ``model`` on the selection set ``data``.

    ``evaluation``: the set the chosen plan will be scored on; when given, ``data`` and it must share
    no row (:func:`analyses.choosing.heldout.check_disjoint`; ``allow_overlap`` only warns).
    """
    if evaluation is not None:
        check_disjoint(data, evaluation, allow_overlap)
    return HeldOutAccuracy(model, processor, data, batch_size)


def compare_policies(model: PreTrainedModel, processor: ProcessorMixin, data: datasets.Dataset, lc: xr.Dataset,
                     ks: Sequence[int], tokens: TokenCounts, compared: Sequence[str] = COMPARED,
                     seeds: Sequence[int] = (0,), batch_size: int = 16, progress: bool = True,
                     evaluation: datasets.Dataset | None = None, allow_overlap: bool = False) -> pd.DataFrame:
    """Accuracy on the selection set ``data`` and decoder FLOPs ratio of each compared policy at each ``k``.

    Returns one row per (policy, k, seed): columns ``policy``, ``k``, ``seed`` (the random
    policy's; 0 otherwise), ``layers`` (the changed layers), ``flops_ratio`` (``shortv``
    convention), ``accuracy``, ``correct`` and ``outcomes`` (per question, ``+`` right / ``-`` wrong,
    for paired intervals: :meth:`HeldOutAccuracy.outcomes`), ``split`` and ``n`` (the split and number
    of questions of ``data`` each accuracy was measured on); plus one ``original`` row at ``k`` 0. ``tokens``: the prompt the
    FLOPs are counted for (``analyses.measuring.tokens.dataset_token_counts``). ``evaluation``: the set the
    chosen plan is scored on, checked to share no row with ``data`` (``allow_overlap`` only warns).
    """
    unknown = sorted(set(compared) - set(COMPARED))
    if unknown:
        raise ValueError(f"unknown comparison(s) {unknown}; choose from {COMPARED}")
    accuracy = accuracy_on(model, processor, data, batch_size, evaluation, allow_overlap)
    where = {"split": accuracy.split, "n": accuracy.n}
    n_layers = lc.sizes["layer"]
    runs = [(policy, k, seed) for k in ks for policy in compared for seed in (seeds if policy == "random" else (0,))]
    rows = [{"policy": "original", "k": 0, "seed": 0, "layers": [], "flops_ratio": 1.0,
             **accuracy.outcomes(EfficiencyPlan.empty(n_layers)), **where}]
    for policy, k, seed in tqdm(runs, desc="comparing policies", unit="plan", disable=not progress):
        plan = freeze_plan(lc, k, "shortv" if policy == "text" else policy, seed)
        layers = list(plan.layers("frozen"))
        if policy == "text":
            with text_frozen(model, layers):
                score = accuracy.outcomes(EfficiencyPlan.empty(n_layers))
            ratio = text_frozen_flops_ratio(model.config, layers, tokens)
        else:
            score, ratio = accuracy.outcomes(plan), flops_ratio(model.config, plan, tokens)
        rows.append({"policy": policy, "k": k, "seed": seed, "layers": layers, "flops_ratio": ratio, **score,
                     **where})
    return pd.DataFrame(rows)


def parse_outcomes(text: str) -> np.ndarray:
    """A comparison row's ``outcomes`` string (``"++-+..."``: one ``+`` right / ``-`` wrong per question, as
    :func:`compare_policies` writes it; ``1``/``0`` are read too) as 0/1 ``[question]``."""
    text = str(text).strip()
    if not text or set(text) - {"+", "-", "0", "1"}:
        raise ValueError(f"outcomes must be a string of + and -, one per question; got {text[:20]!r}")
    return np.array([c in "+1" for c in text], dtype=np.float64)


def mean_outcomes(rows: pd.DataFrame) -> np.ndarray:
    """Per-question outcome ``[question]`` of comparison ``rows`` (one plan, or a random policy's seeds), averaged
    over the rows."""
    return np.mean([parse_outcomes(t) for t in rows.outcomes], axis=0)


def random_seeds_label(comparison: pd.DataFrame) -> str:
    """How a :func:`compare_policies` frame's ``random`` accuracy was measured: ``"random: seed 0"`` for one
    seed, ``"random: mean of 3 seeds"`` for several, ``"random: not compared"`` without random rows."""
    random = comparison[comparison.policy == "random"]
    if not len(random):
        return "random: not compared"
    if "seed" not in random.columns:
        return "random: mean over seeds"
    seeds = sorted(set(random.seed.tolist()))
    return f"random: seed {seeds[0]}" if len(seeds) == 1 else f"random: mean of {len(seeds)} seeds"


POLICY_TABLE_COLUMNS = ("k", "policy", "seeds", "flops_ratio", "n", "accuracy", "low", "high", "method")


def policy_table(comparison: pd.DataFrame, level: float = LEVEL) -> pd.DataFrame:
    """One row per ``(k, policy)`` of a :func:`compare_policies` frame, in its order, with an interval.

    ``accuracy`` is the mean over the policy's seeds (one seed but for ``random``) on the ``n``
    questions; ``low``/``high`` its interval at ``level``: Wilson for one seed, the percentile bootstrap
    over questions of the per-question mean over seeds otherwise (``method`` says which). Returns
    :data:`POLICY_TABLE_COLUMNS`.
    """
    if "outcomes" not in comparison.columns:
        raise ValueError("the comparison has no per-question 'outcomes' column; measure it with compare_policies "
                         "(eemllm compare) to get intervals")
    rows = []
    for (k, policy), group in comparison.groupby(["k", "policy"], sort=False):
        overall = accuracy_table(pd.DataFrame({"score": mean_outcomes(group)}), level=level).iloc[-1]
        rows.append({"k": int(k), "policy": policy, "seeds": len(group), "flops_ratio": float(group.flops_ratio.mean()),
                     "n": int(overall.n), "accuracy": float(overall.accuracy), "low": float(overall.low),
                     "high": float(overall.high), "method": overall.method})
    return pd.DataFrame(rows, columns=list(POLICY_TABLE_COLUMNS))
