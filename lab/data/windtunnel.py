"""The bijection wind tunnel of "The Bayesian Geometry of Transformer Attention" (arXiv:2512.22471).

Task: each sequence draws a fresh random bijection (permutation) ``pi`` of ``V`` values and ``V - 1`` distinct
keys; the tokens are ``[k1, v1+V, k2, v2+V, ..., k_{V-1}]`` (``2V - 3`` tokens, 37 at V=20), keys ``0..V-1``,
values ``V..2V-1``. At the key position of pair ``t`` the model predicts the value that follows. Because keys
never repeat, the exact posterior after ``t-1`` revealed pairs is uniform over the ``V-t+1`` values not yet
seen, with entropy ``log2(V-t+1)`` bits (4.32 bits down to 1 bit at V=20).

Metric (the paper's): entropy MAE, the mean over sequences and key positions of ``|H_model - H_Bayes|`` in
bits, where ``H_model`` is the entropy of the softmax restricted to the ``V`` value tokens. We also report the
KL divergence from the exact posterior (which the entropy MAE cannot see: a model can have the right entropy
on the wrong values) and the authors' code's variant of the MAE (entropies averaged over sequences first).

This module holds the task, the exact posterior, the metrics and the models (the transformer is
:class:`lab.models.gpt.GPT`, so TransformerLens hook names work; a context-blind MLP and an LSTM are the
controls). Training is :mod:`lab.bayes_train`; mechanistic analyses are :mod:`lab.bayes_mech`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lab.errors import LabError

LOG2E = 1.0 / math.log(2.0)


# ----------------------------------------------------------------------------- the task


def n_pairs(V: int) -> int:
    """Key positions per sequence: ``V - 1`` (the last pair would have a certain answer)."""
    return V - 1


def seq_len(V: int) -> int:
    """Tokens per sequence: ``V - 1`` keys and the ``V - 2`` values between them (37 at V=20)."""
    return 2 * V - 3


def check_V(V: int) -> None:
    if not isinstance(V, int) or V < 3:
        raise LabError(f"the wind tunnel needs an integer V >= 3 (keys and values per sequence), got {V!r}")


@dataclass(frozen=True)
class Batch:
    """One batch of bijection sequences.

    Attributes:
        tokens: (B, 2V-3) model input: keys at even positions, values (+V) at odd positions.
        keys: (B, V-1) the keys in order of appearance (distinct).
        values: (B, V-1) ``pi(key)`` for each key, in ``0..V-1``.
        targets: (B, V-1) the token the model must predict at each key position (``values + V``).
    """

    V: int
    tokens: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    targets: torch.Tensor


def sample_batch(V: int, batch_size: int, generator: torch.Generator | None = None) -> Batch:
    """``batch_size`` sequences, each with its own fresh permutation and keys drawn without replacement."""
    check_V(V)
    L = n_pairs(V)
    perm = torch.rand(batch_size, V, generator=generator).argsort(dim=1)  # (B, V): pi
    keys = torch.rand(batch_size, V, generator=generator).argsort(dim=1)[:, :L]  # (B, L) distinct keys
    values = perm.gather(1, keys)  # (B, L)
    tokens = torch.empty(batch_size, seq_len(V), dtype=torch.long)
    tokens[:, 0::2] = keys
    tokens[:, 1::2] = values[:, :-1] + V
    return Batch(V, tokens, keys, values, values + V)


def key_positions(V: int) -> torch.Tensor:
    """Indices of the key tokens in a sequence (where predictions are scored): 0, 2, ..., 2V-4."""
    return torch.arange(0, seq_len(V), 2)


def bayes_posterior(values: torch.Tensor, V: int) -> torch.Tensor:
    """Exact posterior over the next value at every key position: (B, V-1, V).

    At pair ``t`` (1-based) it is uniform over the values not among ``values[:, :t-1]``.
    """
    L = values.shape[1]
    seen = F.one_hot(values, V).cumsum(dim=1)  # (B, L, V): seen among the first t pairs (inclusive)
    seen_before = torch.cat([torch.zeros_like(seen[:, :1]), seen[:, :-1]], dim=1)  # exclusive of pair t
    possible = (seen_before == 0).float()
    if L > V:
        raise LabError(f"{L} pairs cannot come from a bijection of {V} values")
    return possible / possible.sum(dim=-1, keepdim=True)


def bayes_entropy_bits(V: int) -> torch.Tensor:
    """``H_t = log2(V - t + 1)`` for t = 1..V-1 (the same for every sequence)."""
    check_V(V)
    return torch.log2(torch.arange(V, 1, -1, dtype=torch.float64))


def uniform_floor_bits(V: int) -> float:
    """MAE of the predictor that ignores the context (uniform over V values): mean over t of log2(V/(V-t+1))."""
    h = bayes_entropy_bits(V)
    return float((math.log2(V) - h).mean())


# ----------------------------------------------------------------------------- metrics


def value_log_probs(logits: torch.Tensor, V: int) -> torch.Tensor:
    """Log-softmax over the value tokens only, at the key positions: (B, T, 2V) -> (B, V-1, V)."""
    return logits[:, 0::2, V : 2 * V].float().log_softmax(dim=-1)


def entropy_bits(logp: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of distributions given as log-probabilities along the last axis."""
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=-1) * LOG2E  # 0 log 0 = 0


def posterior_metrics(logp: torch.Tensor, values: torch.Tensor, V: int) -> dict[str, torch.Tensor]:
    """Per-position metrics of predicted value distributions ``logp`` (B, V-1, V) against the exact posterior.

    Returns (each of shape (B, V-1)): ``h_model`` and ``h_bayes`` (bits), ``abs_err`` = |h_model - h_bayes|,
    ``kl`` = KL(posterior || model) in bits, and ``mass_eliminated`` = probability on values already seen.
    """
    post = bayes_posterior(values, V)  # (B, L, V)
    h_model = entropy_bits(logp)
    h_bayes = bayes_entropy_bits(V).to(logp)[None, :].expand_as(h_model)
    plogp = torch.where(post > 0, post * post.clamp_min(1e-30).log(), torch.zeros_like(post))
    kl = (plogp - torch.where(post > 0, post * logp, torch.zeros_like(post))).sum(dim=-1) * LOG2E
    mass_elim = (logp.exp() * (post == 0)).sum(dim=-1)
    return {
        "h_model": h_model,
        "h_bayes": h_bayes,
        "abs_err": (h_model - h_bayes).abs(),
        "kl": kl,
        "mass_eliminated": mass_elim,
    }


def summarize(m: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scalar summary of :func:`posterior_metrics`: the entropy MAE (headline), KL, the authors' MAE variant."""
    return {
        "mae_bits": m["abs_err"].mean().item(),
        "kl_bits": m["kl"].mean().item(),
        # the authors' public eval code averages entropies over sequences first, then takes |difference|
        "mae_mean_entropy_bits": (m["h_model"].mean(0) - m["h_bayes"].mean(0)).abs().mean().item(),
        "mass_eliminated": m["mass_eliminated"].mean().item(),
    }
