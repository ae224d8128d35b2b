"""Attention analyses on captured patterns: entropy, sink share, previous-token and induction scores,
base-vs-fine-tuned divergence, and their chance levels. Functions return tensors or polars frames; charts of them
belong to the track that draws them.

Conventions: a pattern stack is ``(L, H, T, T)`` (layer, query head, query, key) for one sequence; rows sum
to one over keys ``<= query``. Averages over query positions skip the trivial rows: position 0 can only look
at itself (entropy 0, sink share 1), and at position 1 "previous token" and "first token" are the same key, so
entropy and sink share average over queries ``q >= 1`` and the previous-token score over ``q >= 2``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import polars as pl
import torch

from lab.errors import LabError
from lab.interp.capture import capture, model_shape
from lab.interp.names import PATTERN_KIND, hook_names

EPS = 1e-12


# ----------------------------------------------------------------------------- capture helpers


def patterns_for(
    model: Any, input_ids: torch.Tensor, *, layers: Sequence[int] | None = None, max_bytes: int | None = None
) -> torch.Tensor:
    """Attention patterns of one sequence ``(1, T)`` for ``layers`` (all by default): ``(L, H, T, T)`` float32."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise LabError(f"patterns_for takes one sequence of shape (1, T), got {tuple(input_ids.shape)}")
    shape = model_shape(model)
    layers = list(range(int(shape["n_layers"]))) if layers is None else list(layers)
    kw = {} if max_bytes is None else {"max_bytes": max_bytes}
    cap = capture(model, input_ids, hook_names(int(shape["n_layers"]), [PATTERN_KIND], layers), logits=False, **kw)
    return cap.stack(PATTERN_KIND, layers)[:, 0].float()


def token_labels(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """``"<position>:<token text>"`` for each id: unique, readable axis labels for heatmaps."""
    out = []
    for i, t in enumerate(ids):
        text = tokenizer.decode([int(t)]).replace("\n", "\\n").replace(" ", "·")
        out.append(f"{i}:{text if text.strip() else repr(text)}")
    return out


# ----------------------------------------------------------------------------- per-row quantities


def row_entropy(patterns: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of every attention row: ``(..., T, T) -> (..., T)``."""
    p = patterns.double().clamp_min(0)
    return -(p * torch.log(p.clamp_min(EPS))).sum(-1).to(patterns.dtype)


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon divergence in bits between distributions along the last axis (0 = same, 1 = disjoint)."""
    p, q = p.double().clamp_min(0), q.double().clamp_min(0)
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * (torch.log2(a.clamp_min(EPS)) - torch.log2(b.clamp_min(EPS)))).sum(-1)

    return (0.5 * kl(p, m) + 0.5 * kl(q, m)).clamp_min(0).float()


# ----------------------------------------------------------------------------- per-head scores


def head_scores(patterns: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-head averages over query rows of a ``(L, H, T, T)`` stack, each ``(L, H)``.

    - ``entropy``: mean row entropy (nats), queries ``q >= 1``.
    - ``entropy_norm``: mean of entropy / ln(q + 1), i.e. relative to uniform attention over the visible keys.
    - ``sink_share``: mean weight on key 0 (the first token), queries ``q >= 1``.
    - ``prev_token``: mean weight on key ``q - 1``, queries ``q >= 2``.
    """
    T = patterns.shape[-1]
    if T < 3:
        raise LabError(f"head scores need at least 3 tokens, got {T}: use a longer prompt")
    ent = row_entropy(patterns)  # (L, H, T)
    q = torch.arange(T, dtype=patterns.dtype)
    norm = ent[..., 1:] / torch.log(q[1:] + 1)
    sink = patterns[..., 1:, 0]
    prev = torch.diagonal(patterns, offset=-1, dim1=-2, dim2=-1)[..., 1:]  # rows 2.. -> key q-1
    return {
        "entropy": ent[..., 1:].mean(-1),
        "entropy_norm": norm.mean(-1),
        "sink_share": sink.mean(-1),
        "prev_token": prev.mean(-1),
    }


def repeated_random_tokens(
    n: int, vocab: Sequence[int], *, generator: torch.Generator, prefix: Sequence[int] = ()
) -> torch.Tensor:
    """``prefix + R + R`` with ``R`` = ``n`` distinct tokens drawn from ``vocab``: shape ``(1, len(prefix) + 2n)``."""
    vocab = torch.as_tensor(list(vocab))
    if n > len(vocab):
        raise LabError(f"cannot draw {n} distinct tokens from a vocabulary of {len(vocab)}")
    r = vocab[torch.randperm(len(vocab), generator=generator)[:n]]
    return torch.cat([torch.as_tensor(list(prefix), dtype=torch.long), r, r]).long().unsqueeze(0)


def induction_scores(patterns: torch.Tensor, n: int, prefix: int = 0) -> torch.Tensor:
    """Mean attention from each token of the second copy to the token *after* its first occurrence.

    For ``prefix + R + R`` with ``|R| = n``, the query at ``t = prefix + n + i`` (token ``R_i``) scores its weight
    on key ``t - n + 1`` (``R_{i+1}`` in the first copy, or the second copy's first token for ``i = n - 1``).
    ``(..., T, T) -> (...)``.
    """
    T = patterns.shape[-1]
    if T != prefix + 2 * n:
        raise LabError(f"induction_scores: pattern length {T} != prefix {prefix} + 2 x {n}")
    diag = torch.diagonal(patterns, offset=1 - n, dim1=-2, dim2=-1)  # entries (t, t - n + 1) for t >= n - 1
    start = prefix + n - (n - 1)  # diag index of t = prefix + n
    return diag[..., start : start + n].mean(-1)


def head_frame(scores: dict[str, torch.Tensor]) -> pl.DataFrame:
    """``{metric: (L, H)}`` -> one row per (layer, head)."""
    first = next(iter(scores.values()))
    L, H = first.shape
    cols: dict[str, Any] = {
        "layer": [l for l in range(L) for _ in range(H)],
        "head": [h for _ in range(L) for h in range(H)],
    }
    for k, v in scores.items():
        cols[k] = v.reshape(-1).tolist()
    return pl.DataFrame(cols)


def compare_patterns(base: torch.Tensor, tuned: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-head change between two ``(L, H, T, T)`` stacks of the same tokens, each ``(L, H)``:
    mean JS divergence over rows ``q >= 1`` (bits), mean row entropy of each, and the entropy change."""
    if base.shape != tuned.shape:
        raise LabError(f"pattern stacks differ in shape: {tuple(base.shape)} vs {tuple(tuned.shape)}")
    js = js_divergence(base, tuned)[..., 1:].mean(-1)
    eb, et = row_entropy(base)[..., 1:].mean(-1), row_entropy(tuned)[..., 1:].mean(-1)
    return {"js_bits": js, "entropy_base": eb, "entropy_tuned": et, "entropy_change": et - eb}


def pattern_frame(
    patterns: torch.Tensor, labels: Sequence[str], heads: Sequence[tuple[int, int]], **extra: Any
) -> pl.DataFrame:
    """Long frame (layer, head, query, key, q_label, k_label, weight) of the chosen ``(layer, head)`` patterns
    (lower triangle only); ``extra`` adds constant columns (e.g. ``model="base"``)."""
    rows: dict[str, list] = {k: [] for k in ("layer", "head", "query", "key", "q_label", "k_label", "weight")}
    T = patterns.shape[-1]
    for layer, head in heads:
        m = patterns[layer, head]
        for qi in range(T):
            for ki in range(qi + 1):
                rows["layer"].append(layer)
                rows["head"].append(head)
                rows["query"].append(qi)
                rows["key"].append(ki)
                rows["q_label"].append(labels[qi])
                rows["k_label"].append(labels[ki])
                rows["weight"].append(float(m[qi, ki]))
    df = pl.DataFrame(rows)
    return df.with_columns([pl.lit(v).alias(k) for k, v in extra.items()]) if extra else df


def layer_profile(
    heads: pl.DataFrame, metrics: tuple[str, ...] = ("entropy_norm", "sink_share", "prev_token", "induction")
) -> pl.DataFrame:
    """Per (layer, metric): mean and max over heads."""
    long = heads.unpivot(index=["layer", "head"], on=list(metrics), variable_name="metric", value_name="value")
    return (
        long.group_by("layer", "metric")
        .agg(pl.col("value").mean().alias("mean over heads"), pl.col("value").max().alias("max over heads"))
        .unpivot(index=["layer", "metric"], variable_name="summary", value_name="value")
        .sort("metric", "summary", "layer")
    )


# ----------------------------------------------------------------------------- chance levels


def uniform_induction_score(n: int, prefix: int = 0) -> float:
    """Induction score of a head that attends uniformly to every visible key (a chance baseline)."""
    return sum(1.0 / (prefix + n + i + 1) for i in range(n)) / n


def chance_prev_token(T: int) -> float:
    """Previous-token score of uniform causal attention over ``T`` tokens (rows ``q >= 2``)."""
    return sum(1.0 / (q + 1) for q in range(2, T)) / (T - 2)


def max_entropy(T: int) -> float:
    """Mean entropy of uniform causal attention over rows ``q >= 1`` (nats)."""
    return sum(math.log(q + 1) for q in range(1, T)) / (T - 1)
