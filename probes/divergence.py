"""Divergences between the original and an intervened model's next-token distributions.

``kl`` is the default and ShortV's Layer Contribution as we read its definition (arXiv
2504.00502, Eq. 1-2): ``KL(P_orig || P_ablated)``, the original model's distribution as the
reference, i.e. the expected extra log-loss of the intervened model on the original model's own
predictions. It is also what ShortV's HF port computes. The official ShortV code computes the
reverse, ``KL(P_ablated || P_orig)``: that is ``kl_reverse`` here. ``js`` (Jensen-Shannon, natural
log, bounded by ln 2) is symmetric and finite even where one distribution has zeros.
"""

from __future__ import annotations

import math

import torch

DIVERGENCES = ("kl", "kl_reverse", "js")


def divergence(log_p: torch.Tensor, log_q: torch.Tensor, name: str = "kl") -> torch.Tensor:
    """Divergence ``name`` between the original ``log_p`` and intervened ``log_q`` log-probabilities.

    Both are ``[..., vocab]`` log-softmax outputs (float32 recommended); returns ``[...]`` in nats.
    """
    if name == "kl":
        return _kl(log_p, log_q)
    if name == "kl_reverse":
        return _kl(log_q, log_p)
    if name == "js":
        log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
        return 0.5 * (_kl(log_p, log_m) + _kl(log_q, log_m))
    raise ValueError(f"unknown divergence {name!r}; choose one of {DIVERGENCES}")


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` over the last dim, with ``0 * log 0 = 0``."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)
