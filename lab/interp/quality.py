"""Transcoders measured on held-out text, streamed batch by batch: per layer the quality numbers (FVU, L0, dead
share) and, per feature, the held-out contexts where it fires most (what ``feature_labels`` turns into labels).

Streaming because the held-out set is large: 100k tokens of SmolLM2's 30 layers' MLP inputs and outputs would be
~14 GB in float32 held at once. Every sum is kept in float64, so ``Quality`` over batches gives
:func:`evaluate`'s numbers on the concatenation up to float rounding (tests check it).

- ``Quality(transcoders, top_n)``: ``add(ins, outs, first_token)`` per batch, then ``rows()`` and ``top()``.
- ``feature_labels(top, token_ids, tokenizer, features)``: for each ``(layer, feature)``, its top contexts as
  text and a short label (the tokens it fires on most, most frequent first).
"""

from __future__ import annotations

from collections import Counter

import polars as pl
import torch


def fvu(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained: sum |y - y_hat|^2 / sum |y - mean(y)|^2 over tokens."""
    return float(((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())


@torch.no_grad()
def evaluate(transcoders, ins: list[torch.Tensor], outs: list[torch.Tensor]) -> list[dict]:
    """Per layer: FVU, L0 (mean active features per token), dead share (never active on these tokens)."""
    rows = []
    for layer, (tc, x, y) in enumerate(zip(transcoders, ins, outs, strict=True)):
        acts = tc.encode(x)
        y_hat = tc.decode(acts, x)
        active = acts != 0
        rows.append(
            {
                "layer": layer,
                "fvu": fvu(y, y_hat),
                "l0": float(active.sum(1).float().mean()),
                "dead_share": float((~active.any(0)).float().mean()),
                "tokens": int(x.shape[0]),
            }
        )
    return rows


class Quality:
    """Running held-out quality of one transcoder per layer, plus each feature's ``top_n`` strongest activations
    (value and the index of the token in the evaluation's stream)."""

    def __init__(self, transcoders: list, top_n: int = 8):
        self.transcoders, self.top_n = transcoders, top_n
        n, f = len(transcoders), transcoders[0].W_dec.shape[0]
        d = transcoders[0].W_dec.shape[1]
        self.sse = torch.zeros(n, dtype=torch.float64)
        self.sum_y = torch.zeros(n, d, dtype=torch.float64)
        self.sum_y2 = torch.zeros(n, dtype=torch.float64)
        self.active = torch.zeros(n, f, dtype=torch.bool)
        self.tokens = 0
        self.l0_sum = torch.zeros(n, dtype=torch.float64)
        self.top_value = torch.full((n, top_n, f), float("-inf"))
        self.top_token = torch.full((n, top_n, f), -1, dtype=torch.long)

    @torch.no_grad()
    def add(self, ins: list[torch.Tensor], outs: list[torch.Tensor], first_token: int) -> None:
        """One batch: per layer (tokens, d_model) inputs and outputs; ``first_token`` is the stream index of the
        batch's first token."""
        n_tok = ins[0].shape[0]
        where = torch.arange(first_token, first_token + n_tok)
        for layer, (tc, x, y) in enumerate(zip(self.transcoders, ins, outs, strict=True)):
            acts = tc.encode(x)
            y_hat = tc.decode(acts, x)
            self.sse[layer] += float(((y - y_hat).double() ** 2).sum())
            self.sum_y[layer] += y.double().sum(0)
            self.sum_y2[layer] += float((y.double() ** 2).sum())
            self.active[layer] |= (acts != 0).any(0)
            self.l0_sum[layer] += float((acts != 0).sum())
            vals = torch.cat([self.top_value[layer], acts.masked_fill(acts == 0, float("-inf"))])
            toks = torch.cat([self.top_token[layer], where[:, None].expand(n_tok, acts.shape[1])])
            best = vals.topk(self.top_n, dim=0)
            self.top_value[layer], self.top_token[layer] = best.values, toks.gather(0, best.indices)
        self.tokens += n_tok

    def rows(self) -> list[dict]:
        """Per layer: FVU (sum |y - y_hat|^2 / sum |y - mean y|^2), L0 (mean active features per token), dead
        share (never active on these tokens) and the token count."""
        out = []
        for layer in range(len(self.transcoders)):
            total = self.sum_y2[layer] - (self.sum_y[layer] ** 2).sum() / self.tokens
            out.append(
                {
                    "layer": layer,
                    "fvu": float(self.sse[layer] / total),
                    "l0": float(self.l0_sum[layer] / self.tokens),
                    "dead_share": float((~self.active[layer]).float().mean()),
                    "tokens": self.tokens,
                }
            )
        return out

    def top(self) -> dict[str, torch.Tensor]:
        """``value`` and ``token`` (stream index; -1 where the feature fired fewer than ``top_n`` times), both
        (layers, top_n, features), strongest first."""
        return {"value": self.top_value.contiguous(), "token": self.top_token.contiguous()}


def feature_labels(top: dict, token_ids: torch.Tensor, tokenizer, features, window: int = 6) -> list[dict]:
    """For each ``(layer, feature)`` in ``features``: up to ``top_n`` held-out contexts where it fired most (the
    firing token in brackets, ``window`` tokens before it) and a label of its three most frequent firing tokens.

    ``token_ids`` is the evaluation's (n_seqs, 1 + seq_len) batch (BOS first, left out of the stream), the order
    ``Quality.add`` saw its tokens in."""
    seq_len = token_ids.shape[1] - 1
    rows = []
    for layer, feat in features:
        vals, toks = top["value"][layer, :, feat], top["token"][layer, :, feat]
        contexts, fired = [], []
        for v, t in zip(vals.tolist(), toks.tolist(), strict=True):
            if t < 0:
                continue
            seq, pos = divmod(t, seq_len)
            ids = token_ids[seq, 1:].tolist()
            before = tokenizer.decode(ids[max(0, pos - window) : pos])
            tok = tokenizer.decode([ids[pos]])
            contexts.append({"activation": v, "text": f"{before}[{tok}]"})
            fired.append(tok.strip() or repr(tok))
        common = [t for t, _ in Counter(fired).most_common(3)]
        rows.append(
            {
                "layer": layer,
                "feature": feat,
                "label": " · ".join(common) if common else "(never fired on held-out text)",
                "contexts": contexts,
                "max_activation": float(vals[0]) if contexts else 0.0,
            }
        )
    return rows


def label_frame(top: dict, tokenizer, features) -> pl.DataFrame:
    """:func:`feature_labels` of ``features`` as a table: layer, feature, label, strongest activation, and the
    contexts with their activations (lists), strongest first; ``top`` is a build's held-out record (with its
    ``eval_ids``)."""
    rows = feature_labels(top, top["eval_ids"], tokenizer, features)
    return pl.DataFrame(
        [
            {
                "layer": r["layer"],
                "feature": r["feature"],
                "label": r["label"],
                "max_activation": r["max_activation"],
                "contexts": [c["text"] for c in r["contexts"]],
                "activations": [c["activation"] for c in r["contexts"]],
            }
            for r in rows
        ],
        schema={
            "layer": pl.Int64,
            "feature": pl.Int64,
            "label": pl.String,
            "max_activation": pl.Float64,
            "contexts": pl.List(pl.String),
            "activations": pl.List(pl.Float64),
        },
    )
