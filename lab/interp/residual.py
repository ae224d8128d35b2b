"""Residual-stream analyses on captured activations: norms per layer, attention vs FFN contributions, the logit
lens, position similarity, and zero-ablation of sublayers. Frames out; charts of them belong to the track that
draws them.

All functions take one sequence: a :class:`lab.interp.capture.Capture` of ``(1, T, d)`` tensors from
:func:`capture_residuals`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import polars as pl
import torch

from lab.errors import LabError
from lab.interp.capture import Capture, capture, model_shape, unembed
from lab.interp.interventions import run_with_ablation
from lab.interp.names import FINAL_NAME, RESIDUAL_KINDS, act_name, hook_names

EPS = 1e-12


def capture_residuals(model: Any, input_ids: torch.Tensor) -> tuple[Capture, int]:
    """Every residual name of every layer (and the final norm) for one sequence; returns (capture, n_layers)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise LabError(f"residual analyses take one sequence of shape (1, T), got {tuple(input_ids.shape)}")
    n = int(model_shape(model)["n_layers"])
    return capture(model, input_ids, [*hook_names(n, RESIDUAL_KINDS), FINAL_NAME]), n


def _r(cap: Capture, layer: int, kind: str) -> torch.Tensor:
    """One activation of the captured sequence in float64: ``(T, d)``."""
    return cap[act_name(kind, layer)][0].double()


def residual_norms(cap: Capture, n_layers: int, labels: Sequence[str]) -> pl.DataFrame:
    """L2 norm of the residual stream per (layer, point, position). ``point``: pre / mid / post."""
    rows: dict[str, list] = {k: [] for k in ("layer", "point", "position", "token", "norm")}
    for l in range(n_layers):
        for point in ("pre", "mid", "post"):
            norms = _r(cap, l, f"resid_{point}").norm(dim=-1)
            for pos, v in enumerate(norms.tolist()):
                rows["layer"].append(l)
                rows["point"].append(point)
                rows["position"].append(pos)
                rows["token"].append(labels[pos])
                rows["norm"].append(v)
    return pl.DataFrame(rows)


def contributions(cap: Capture, n_layers: int, labels: Sequence[str]) -> pl.DataFrame:
    """What each sublayer writes, per (layer, sublayer, position).

    - ``norm``: ‖out‖.
    - ``proj_stream``: out · r / ‖r‖ with r the stream it is added to (``resid_pre`` for attention,
      ``resid_mid`` for the MLP); negative means it erases part of what is there.
    - ``cos_stream``: the same as a cosine.
    - ``proj_final``: out · f / ‖f‖ with f the last layer's ``resid_post`` at that position: how much it
      pushes towards the final state.
    - ``share``: ‖out‖ / (‖attn_out‖ + ‖mlp_out‖) of the same layer and position.
    """
    final = _r(cap, n_layers - 1, "resid_post")
    f_unit = final / final.norm(dim=-1, keepdim=True).clamp_min(EPS)
    rows: dict[str, list] = {
        k: []
        for k in ("layer", "sublayer", "position", "token", "norm", "proj_stream", "cos_stream", "proj_final", "share")
    }
    for l in range(n_layers):
        attn, mlp = _r(cap, l, "attn_out"), _r(cap, l, "mlp_out")
        total = attn.norm(dim=-1) + mlp.norm(dim=-1)
        for sub, out, stream in (("attention", attn, _r(cap, l, "resid_pre")), ("mlp", mlp, _r(cap, l, "resid_mid"))):
            s_norm = stream.norm(dim=-1).clamp_min(EPS)
            o_norm = out.norm(dim=-1)
            proj = (out * stream).sum(-1) / s_norm
            cos = proj / o_norm.clamp_min(EPS)
            pf = (out * f_unit).sum(-1)
            share = o_norm / total.clamp_min(EPS)
            for pos in range(out.shape[0]):
                rows["layer"].append(l)
                rows["sublayer"].append(sub)
                rows["position"].append(pos)
                rows["token"].append(labels[pos])
                rows["norm"].append(float(o_norm[pos]))
                rows["proj_stream"].append(float(proj[pos]))
                rows["cos_stream"].append(float(cos[pos]))
                rows["proj_final"].append(float(pf[pos]))
                rows["share"].append(float(share[pos]))
    return pl.DataFrame(rows)


def logit_lens(model: Any, cap: Capture, n_layers: int, tokenizer: Any, labels: Sequence[str]) -> pl.DataFrame:
    """Read the residual stream with the model's own final norm + unembedding after every block.

    ``depth`` = blocks applied: 0 is the embeddings (``resid_pre`` of block 0), ``depth = l + 1`` is
    ``resid_post`` of block ``l``; the last depth is the model's output. Per (depth, position): the top token
    and its probability, KL(final || lens) in nats, the rank of the final top token, and whether it is top-1.
    """
    if cap.logits is None:
        raise LabError("logit_lens needs the capture's logits: capture with logits=True")
    final_logp = torch.log_softmax(cap.logits[0].double(), -1)  # (T, V)
    final_p = final_logp.exp()
    final_top = final_logp.argmax(-1)  # (T,)
    rows: dict[str, list] = {
        k: []
        for k in (
            "depth",
            "position",
            "token",
            "top_token",
            "top_prob",
            "kl_to_final",
            "final_token_rank",
            "matches_final",
        )
    }
    for depth in range(n_layers + 1):
        resid = cap[act_name("resid_pre", 0) if depth == 0 else act_name("resid_post", depth - 1)]
        logp = torch.log_softmax(unembed(model, resid)[0].double(), -1)
        kl = (final_p * (final_logp - logp)).sum(-1).clamp_min(0)
        top_p, top = logp.max(-1)
        rank = (logp > logp.gather(-1, final_top[:, None])).sum(-1)
        for pos in range(logp.shape[0]):
            rows["depth"].append(depth)
            rows["position"].append(pos)
            rows["token"].append(labels[pos])
            rows["top_token"].append(tokenizer.decode([int(top[pos])]))
            rows["top_prob"].append(float(top_p[pos].exp()))
            rows["kl_to_final"].append(float(kl[pos]))
            rows["final_token_rank"].append(int(rank[pos]))
            rows["matches_final"].append(bool(top[pos] == final_top[pos]))
    return pl.DataFrame(rows)


def first_stable_depth(lens: pl.DataFrame) -> pl.DataFrame:
    """Per position, the first depth from which the lens's top-1 equals the final top-1 at every later depth."""
    out = []
    for (pos,), g in lens.sort("depth").group_by(["position"], maintain_order=True):
        m = g["matches_final"].to_list()
        d = g["depth"].to_list()
        first = d[-1]
        for i in range(len(m) - 1, -1, -1):
            if not m[i]:
                break
            first = d[i]
        out.append({"position": pos, "token": g["token"][0], "first_stable_depth": first})
    return pl.DataFrame(out).sort("position")


def position_similarity(
    cap: Capture, n_layers: int, layers: Sequence[int] | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Cosine similarity between positions of ``resid_post``.

    Returns (summary per layer: mean pairwise cosine over all pairs ``i < j``, over pairs not involving
    position 0 — whose vector is often very large — and over neighbouring pairs ``(i, i + 1)``, ``i >= 1``;
    long frame ``(layer, i, j, cos)``, ``j <= i``, for ``layers``).
    """
    keep = set(layers or [])
    summary, long = [], {k: [] for k in ("layer", "i", "j", "cos")}
    for l in range(n_layers):
        x = _r(cap, l, "resid_post")
        T = x.shape[0]
        unit = x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)
        sim = unit @ unit.T
        iu = torch.triu_indices(T, T, offset=1)
        pairs = sim[iu[0], iu[1]]
        no0 = pairs[iu[0] > 0]
        adjacent = torch.diagonal(sim, offset=1)[1:]  # pairs (i, i + 1), i >= 1
        summary.append(
            {
                "layer": l,
                "mean_cos_all": float(pairs.mean()),
                "mean_cos_without_first": float(no0.mean()) if no0.numel() else float("nan"),
                "mean_cos_adjacent": float(adjacent.mean()) if adjacent.numel() else float("nan"),
            }
        )
        if l in keep:
            for i in range(T):
                for j in range(i + 1):  # symmetric: the lower triangle is enough
                    long["layer"].append(l)
                    long["i"].append(i)
                    long["j"].append(j)
                    long["cos"].append(float(sim[i, j]))
    return pl.DataFrame(summary), pl.DataFrame(long)


def ablation_effects(
    model: Any, input_ids: torch.Tensor, n_layers: int, logits: torch.Tensor | None = None
) -> pl.DataFrame:
    """Zero each layer's attention output, then each layer's MLP output, one at a time.

    Per (layer, sublayer): KL(original || ablated) of the next-token distribution averaged over positions
    (nats), the same at the last position, the share of positions whose top-1 token changes, and the change
    in log-probability of the original top-1 token at the last position.
    """
    with torch.no_grad():
        base = logits if logits is not None else model(input_ids=input_ids, use_cache=False).logits.detach().cpu()
    base_logp = torch.log_softmax(base[0].double(), -1)
    base_p, top = base_logp.exp(), base_logp.argmax(-1)
    rows = []
    for l in range(n_layers):
        for sub, kind in (("attention", "attn_out"), ("mlp", "mlp_out")):
            abl = torch.log_softmax(run_with_ablation(model, input_ids, [act_name(kind, l)])[0].double(), -1)
            kl = (base_p * (base_logp - abl)).sum(-1).clamp_min(0)
            rows.append(
                {
                    "layer": l,
                    "sublayer": sub,
                    "kl_mean": float(kl.mean()),
                    "kl_last": float(kl[-1]),
                    "top1_changed": float((abl.argmax(-1) != top).double().mean()),
                    "delta_logprob_last": float(abl[-1, top[-1]] - base_logp[-1, top[-1]]),
                }
            )
    return pl.DataFrame(rows)
