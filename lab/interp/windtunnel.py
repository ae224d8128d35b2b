"""Mechanistic checks of the paper's claims on a trained wind-tunnel transformer (:class:`lab.models.gpt.GPT`).

Every function takes a model and a :class:`lab.data.windtunnel.Batch`, reads activations at the GPT's named hook
points (and, to ablate, replaces them there with :mod:`lab.interp.interventions`), and returns a polars frame;
nothing here trains. Claims and the measurement used for each:

- layer-0 keys form a near-orthogonal basis -> :func:`key_orthogonality` (mean |cos| between the keys that each
  token id produces, per head), compared with the same model at initialisation;
- attention routes the evidence -> :func:`attention_routing` (where key positions attend: mass on revealed values,
  how evenly, and the query-key cosine by target type, per layer and head);
- final states lie on a low-dimensional manifold parameterised by posterior entropy -> :func:`final_state_pca`;
- the residual stream carries the belief -> :func:`logit_lens` (KL to the exact posterior after every sublayer);
- attention routes, the FFN updates -> :func:`ablations` (zero or mean ablation of each attention block, FFN
  and layer-0 head, and the entropy MAE that results).
"""

from __future__ import annotations

import math

import polars as pl
import torch
import torch.nn as nn

from lab.data.windtunnel import Batch, bayes_entropy_bits, n_pairs, posterior_metrics, summarize, value_log_probs
from lab.errors import LabError
from lab.interp.interventions import filled, replaced
from lab.interp.names import FINAL_NAME, PATTERN_KIND, act_name, hook_names
from lab.models.gpt import GPT


def _check(model: nn.Module) -> GPT:
    if not isinstance(model, GPT):
        raise LabError(f"mechanistic analyses need the transformer (lab.models.gpt.GPT), got {type(model).__name__}")
    return model


def _qk(model: GPT, layer: int, resid_pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys (B, nh, T, hs) of block ``layer`` from its input residual stream."""
    blk = model.blocks[layer]
    B, T, C = resid_pre.shape
    nh = model.cfg.n_head
    q, k, _ = blk.attn.qkv(blk.ln1(resid_pre)).split(C, dim=2)
    return tuple(t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k))  # type: ignore[return-value]


def mean_abs_offdiag_cos(vectors: torch.Tensor) -> float:
    """Mean |cosine| over all pairs of distinct rows of ``vectors`` (n, d)."""
    u = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = u @ u.T
    n = cos.shape[0]
    return float(cos[~torch.eye(n, dtype=torch.bool)].abs().mean())


def random_vectors_abs_cos(d: int) -> float:
    """E|cos| between two independent isotropic Gaussian vectors in ``d`` dimensions (exact)."""
    # |cos| has density ∝ (1 - c^2)^((d-3)/2) on [0, 1]: E|c| = Γ(d/2) / (√π Γ((d+1)/2))
    return math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)


@torch.no_grad()
def key_orthogonality(model: nn.Module, batch: Batch, layer: int = 0) -> pl.DataFrame:
    """Per head: mean |cos| between the average key vectors of the V key tokens (and of the V value tokens).

    Each token id's key is averaged over all its occurrences (positions) in ``batch``.
    """
    model = _check(model)
    V = batch.V
    name = act_name("resid_pre", layer)
    _, _, cache = model(batch.tokens, capture={name})
    _, k = _qk(model, layer, cache[name])  # (B, nh, T, hs)
    ids = batch.tokens.reshape(-1)  # (B*T,)
    rows = []
    for h in range(model.cfg.n_head):
        kh = k[:, h].reshape(-1, k.shape[-1])  # (B*T, hs)
        sums = torch.zeros(2 * V, kh.shape[1]).index_add_(0, ids, kh)
        counts = torch.bincount(ids, minlength=2 * V).clamp_min(1)[:, None]
        means = sums / counts  # (2V, hs)
        for kind, sl in (("key tokens", slice(0, V)), ("value tokens", slice(V, 2 * V))):
            rows.append({"layer": layer, "head": h, "tokens": kind, "mean_abs_cos": mean_abs_offdiag_cos(means[sl])})
    return pl.DataFrame(rows)


@torch.no_grad()
def attention_routing(model: nn.Module, batch: Batch) -> pl.DataFrame:
    """Where each head attends from key positions (queries for the next value), per layer and head.

    Columns: ``value_mass`` (attention on revealed value tokens), ``key_mass`` (on earlier key tokens),
    ``self_mass`` (on the current token), ``value_evenness`` (entropy of the attention restricted to the
    revealed values, divided by its maximum log(n): 1 = every revealed value weighted equally), and
    ``qk_cos_value`` / ``qk_cos_key``: mean cosine between the query and the keys of value / key tokens.
    Key positions with at least two revealed values (t >= 3) only.
    """
    model = _check(model)
    _, _, cache = model(batch.tokens, capture=set(hook_names(model.cfg.n_layer, [PATTERN_KIND, "hook_resid_pre"])))
    T = batch.tokens.shape[1]
    qpos = torch.arange(4, T, 2)  # key positions with t >= 3
    pos = torch.arange(T)
    is_val = (pos % 2 == 1)[None, :] & (pos[None, :] < qpos[:, None])  # (Q, T) revealed values
    is_key = (pos % 2 == 0)[None, :] & (pos[None, :] < qpos[:, None])  # earlier keys
    n_val = is_val.sum(1).double()  # (Q,)
    rows = []
    for l in range(model.cfg.n_layer):
        pat = cache[act_name("pattern", l)][:, :, qpos].double()  # (B, nh, Q, T)
        q, k = _qk(model, l, cache[act_name("resid_pre", l)])
        qn = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        kn = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        cos = (qn[:, :, qpos] @ kn.transpose(-2, -1)).double()  # (B, nh, Q, T)
        for h in range(model.cfg.n_head):
            p = pat[:, h]  # (B, Q, T)
            vm = (p * is_val).sum(-1)
            pv = (p * is_val) / vm.clamp_min(1e-30)[..., None]
            ent = -(torch.where(pv > 0, pv * pv.clamp_min(1e-30).log(), torch.zeros_like(pv))).sum(-1)
            c = cos[:, h]
            rows.append(
                {
                    "layer": l,
                    "head": h,
                    "value_mass": vm.mean().item(),
                    "key_mass": (p * is_key).sum(-1).mean().item(),
                    "self_mass": p[:, torch.arange(len(qpos)), qpos].mean().item(),
                    "value_evenness": (ent / n_val.log()).mean().item(),
                    "qk_cos_value": ((c * is_val).sum(-1) / is_val.sum(1)).mean().item(),
                    "qk_cos_key": ((c * is_key).sum(-1) / is_key.sum(1)).mean().item(),
                }
            )
    return pl.DataFrame(rows)


@torch.no_grad()
def final_state_pca(model: nn.Module, batch: Batch, n_components: int = 5) -> tuple[pl.DataFrame, pl.DataFrame]:
    """PCA of the final normalised states at key positions.

    Returns ``(components, points)``: per component its variance share and its Pearson correlation with the
    posterior entropy H_Bayes (which here is a function of the position t alone) and with the model's own
    predictive entropy; and the per-state PC1/PC2 scores with t, H_Bayes and H_model (for a scatter plot).
    """
    model = _check(model)
    V, L = batch.V, n_pairs(batch.V)
    logits, _, cache = model(batch.tokens, capture={FINAL_NAME})
    X = cache[FINAL_NAME][:, 0::2].reshape(-1, model.cfg.d_model).double()  # (B*L, C)
    Xc = X - X.mean(0)
    _, S, Vh = torch.linalg.svd(Xc, full_matrices=False)
    share = S**2 / (S**2).sum()
    scores = Xc @ Vh[:n_components].T  # (B*L, k)
    h_bayes = bayes_entropy_bits(V).repeat(batch.tokens.shape[0])  # (B*L,)
    m = posterior_metrics(value_log_probs(logits, V), batch.values, V)
    h_model = m["h_model"].reshape(-1).double()

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30))

    comps = pl.DataFrame(
        [
            {
                "component": i + 1,
                "variance_share": share[i].item(),
                "corr_h_bayes": corr(scores[:, i], h_bayes),
                "corr_h_model": corr(scores[:, i], h_model),
            }
            for i in range(n_components)
        ]
    )
    t = torch.arange(1, L + 1).repeat(batch.tokens.shape[0])
    points = pl.DataFrame(
        {
            k: v.detach().cpu().numpy()
            for k, v in (
                ("t", t),
                ("h_bayes", h_bayes),
                ("h_model", h_model),
                ("pc1", scores[:, 0]),
                ("pc2", scores[:, 1]),
            )
        }
    )
    return comps, points


def lens_stages(n_layer: int) -> list[tuple[str, str, int, str]]:
    """(stage label, hook name, layer, sublayer) for the logit lens, in forward order."""
    out = [("embed", act_name("resid_pre", 0), -1, "embed")]
    for l in range(n_layer):
        out += [
            (f"L{l} +attn", act_name("resid_mid", l), l, "attn"),
            (f"L{l} +ffn", act_name("resid_post", l), l, "ffn"),
        ]
    return out


@torch.no_grad()
def logit_lens(model: nn.Module, batch: Batch) -> pl.DataFrame:
    """KL(posterior || lens) and entropy MAE after every sublayer, reading the residual stream through the
    final LayerNorm and the unembedding (the last stage equals the model's output)."""
    model = _check(model)
    stages = lens_stages(model.cfg.n_layer)
    _, _, cache = model(batch.tokens, capture={s[1] for s in stages})
    rows = []
    for i, (label, name, layer, sub) in enumerate(stages):
        logits = model.lm_head(model.ln_final(cache[name]))
        s = summarize(posterior_metrics(value_log_probs(logits, batch.V), batch.values, batch.V))
        rows.append({"stage": i, "label": label, "layer": layer, "sublayer": sub, **s})
    return pl.DataFrame(rows)


@torch.no_grad()
def _score(model: GPT, batch: Batch) -> dict[str, float]:
    logits, _, _ = model(batch.tokens)
    return summarize(posterior_metrics(value_log_probs(logits, batch.V), batch.values, batch.V))


ABLATION_KINDS = {"attn": "attn_out", "ffn": "mlp_out", "head": "z"}  # target -> the hook point replaced


@torch.no_grad()
def ablate(
    model: nn.Module, batch: Batch, target: str, layer: int, head: int | None = None, method: str = "zero"
) -> dict[str, float]:
    """Metrics with one component replaced: ``target`` "attn" (a whole attention block's output), "ffn", or "head"
    (one head's output before the output projection, ``attn.hook_z``); ``method`` "zero" or "mean" (its mean over
    the batch at each position, measured on ``batch`` itself)."""
    model = _check(model)
    if target not in ABLATION_KINDS or method not in ("zero", "mean"):
        raise LabError(f"ablate: target must be attn/ffn/head and method zero/mean, got {target!r}, {method!r}")
    if not 0 <= layer < model.cfg.n_layer:
        raise LabError(f"layer {layer} out of range for a {model.cfg.n_layer}-layer model")
    nh = model.cfg.n_head
    if target == "head" and not (head is not None and 0 <= head < nh):
        raise LabError(f"head must be in 0..{nh - 1}, got {head!r}")
    name = act_name(ABLATION_KINDS[target], layer)
    part = (slice(None), slice(None), head) if target == "head" else ...  # z is (B, T, nh, hs): one head's slice
    mean: torch.Tensor | None = None
    if method == "mean":  # the component's batch-mean output at each position
        _, _, cache = model(batch.tokens, capture={name})
        mean = cache[name][part].mean(0, keepdim=True)  # (1, T, ·)
    with replaced(model, {name: filled(part, mean)}):
        return _score(model, batch)


def ablations(model: nn.Module, batch: Batch, head_layer: int = 0) -> pl.DataFrame:
    """Entropy MAE and KL with each attention block, each FFN and each head of ``head_layer`` ablated
    (zero and mean), next to the intact model (``target == "none"``)."""
    model = _check(model)
    base = _score(model, batch)
    rows = [{"target": "none", "layer": -1, "head": -1, "method": "none", **base}]
    for method in ("zero", "mean"):
        for l in range(model.cfg.n_layer):
            for target in ("attn", "ffn"):
                rows.append(
                    {
                        "target": target,
                        "layer": l,
                        "head": -1,
                        "method": method,
                        **ablate(model, batch, target, l, method=method),
                    }
                )
        for h in range(model.cfg.n_head):
            rows.append(
                {
                    "target": "head",
                    "layer": head_layer,
                    "head": h,
                    "method": method,
                    **ablate(model, batch, "head", head_layer, h, method),
                }
            )
    df = pl.DataFrame(rows)
    return df.with_columns((pl.col("mae_bits") - base["mae_bits"]).alias("delta_mae_bits"))
