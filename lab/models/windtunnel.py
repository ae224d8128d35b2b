"""The wind tunnel's networks: lab's GPT (TransformerLens hook names) and the paper's controls, a context-blind
MLP and an LSTM, sized to match a transformer's parameter count; and :func:`key_logits`, their training forward.

Training scores the predictions at the key positions only (every other token), so :func:`key_logits` computes only
what those need: the MLP runs at the key positions alone, the LSTM's readout too, and the transformer's last block
needs the keys and values of every position but queries, attention output, MLP, final norm and unembedding only at
the key positions (about a fifth of the 2-layer model's FLOPs). It is the same function of the weights as
``model(tokens)[..., 0::2, :]`` up to float rounding (tests/test_speed_wind.py). On the CPU its attention is an
explicit masked softmax over ``baddbmm``: at 37 tokens and 16 dims per head torch's fused CPU kernel is ~1.3x slower
forward and backward (measured here); elsewhere it is ``scaled_dot_product_attention``. It is written here rather
than as a mode of ``lab.models.gpt.GPT`` because only this task knows where its scored positions are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lab.data.windtunnel import check_V, seq_len
from lab.errors import LabError
from lab.models.gpt import GPT, GPTConfig

# ----------------------------------------------------------------------------- models


KINDS = ("transformer", "mlp", "lstm")


@dataclass(frozen=True)
class ModelSpec:
    """Which network to train on the wind tunnel, and its size."""

    kind: str = "transformer"  # "transformer" (lab.models.gpt.GPT), "mlp" (context-blind control) or "lstm"
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    d_hidden: int = 0  # MLP/LSTM hidden width; 0 = chosen to match a transformer's parameter count

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LabError(f"unknown model kind {self.kind!r}: choose {', '.join(KINDS)}")
        if self.n_layer < 1 or self.d_model < 1 or self.d_hidden < 0:
            raise LabError(
                f"n_layer and d_model must be positive and d_hidden >= 0 (got {self.n_layer}, "
                f"{self.d_model}, {self.d_hidden})"
            )
        if self.kind == "transformer" and (self.n_head < 1 or self.d_model % self.n_head):
            raise LabError(f"d_model {self.d_model} must be divisible by n_head {self.n_head}")


class ContextBlindMLP(nn.Module):
    """The paper's control: token + position embeddings through residual FFN blocks; no mixing across positions.

    Every position sees only its own token and index, so it cannot know which values were revealed. Its best
    possible prediction is uniform over the V values (the analytic floor of the entropy MAE).
    """

    def __init__(self, vocab_size: int, block_size: int, n_layer: int, d_model: int, d_hidden: int):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(block_size, d_model)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(d_model, bias=False),
                nn.Linear(d_model, d_hidden, bias=False),
                nn.GELU(),
                nn.Linear(d_hidden, d_model, bias=False),
            )
            for _ in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(d_model, bias=False)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))  # (B, T, C)
        for blk in self.blocks:
            x = x + blk(x)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab)


class LSTMModel(nn.Module):
    """A recurrent control: embeddings -> LSTM -> tied readout (the paper's LSTM reaches 0.009 bits)."""

    def __init__(self, vocab_size: int, n_layer: int, d_model: int, d_hidden: int):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, d_model)
        self.lstm = nn.LSTM(d_model, d_hidden, num_layers=n_layer, batch_first=True)
        self.out = nn.Linear(d_hidden, d_model, bias=False)
        self.ln_f = nn.LayerNorm(d_model, bias=False)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        nn.init.normal_(self.wte.weight, 0.0, 0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.wte(idx))  # (B, T, H)
        return self.lm_head(self.ln_f(self.out(h)))  # (B, T, vocab)


def n_params(model: nn.Module) -> int:
    """Distinct trainable parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def transformer_config(spec: ModelSpec, V: int) -> GPTConfig:
    return GPTConfig(
        vocab_size=2 * V,
        block_size=seq_len(V),
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        d_model=spec.d_model,
        pos_emb="learned",
    )


def build_model(spec: ModelSpec, V: int, *, match: int | None = None) -> nn.Module:
    """A freshly initialised model (seed torch before calling). ``match``: parameter count for the controls'
    hidden width when ``spec.d_hidden`` is 0 (the closest width that does not exceed it)."""
    check_V(V)
    if spec.kind == "transformer":
        return GPT(transformer_config(spec, V))
    make = {
        "mlp": lambda h: ContextBlindMLP(2 * V, seq_len(V), spec.n_layer, spec.d_model, h),
        "lstm": lambda h: LSTMModel(2 * V, spec.n_layer, spec.d_model, h),
    }[spec.kind]  # ModelSpec validated the kind
    if spec.d_hidden:
        return make(spec.d_hidden)
    if not match:
        raise LabError(f"a {spec.kind} needs d_hidden or a parameter count to match")
    lo, hi = 1, 2
    while n_params(make(hi)) <= match:  # grow an upper bound, then bisect for the largest width that fits
        lo, hi = hi, 2 * hi
    while lo < hi - 1:
        mid = (lo + hi) // 2
        if n_params(make(mid)) <= match:
            lo = mid
        else:
            hi = mid
    return make(lo)


# ----------------------------------------------------------------------------- the training forward


def key_logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Logits at the key positions ``0, 2, 4, ...`` only: tokens (B, T) -> (B, ceil(T/2), vocab), equal to the
    model's own forward sliced there up to float rounding. A GPT with dropout, rotary embeddings or a hook on one of
    its hook points, and any other module, takes its own full forward."""
    if isinstance(model, ContextBlindMLP):  # position-wise: the other positions never reach a key position
        pos = torch.arange(0, tokens.shape[1], 2, device=tokens.device)
        x = model.wte(tokens[:, 0::2]) + model.wpe(pos)  # (B, L, C)
        for blk in model.blocks:
            x = x + blk(x)
        return model.lm_head(model.ln_f(x))  # (B, L, vocab)
    if isinstance(model, LSTMModel):
        h, _ = model.lstm(model.wte(tokens))  # (B, T, H): the recurrence needs every position
        return model.lm_head(model.ln_f(model.out(h[:, 0::2])))  # (B, L, vocab)
    if isinstance(model, GPT) and _plain(model):
        return _gpt_key_logits(model, tokens)
    out = model(tokens)
    return (out[0] if isinstance(out, tuple) else out)[:, 0::2]


def _plain(model: GPT) -> bool:
    """Whether the GPT's forward is the plain one that :func:`_gpt_key_logits` reproduces."""
    return (
        model.cfg.dropout == 0.0
        and model.wpe is not None
        and not any(m._forward_hooks or m._forward_pre_hooks for m in model.hook_points().values())
    )


def _gpt_key_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    B, T = idx.shape
    C, nh = model.cfg.d_model, model.cfg.n_head
    if T > model.cfg.block_size:
        raise LabError(f"sequence of {T} tokens is longer than the model's block size {model.cfg.block_size}")
    x = model.wte(idx) + model.wpe(torch.arange(T, device=idx.device))  # (B, T, C)
    *body, last = model.blocks
    for blk in body:
        q, k, v = F.linear(blk.ln1(x), blk.attn.qkv.weight).split(C, dim=2)
        y = _attention(*(_heads(t, nh) for t in (q, k, v)), keys_only=False)  # (B, T, C)
        x = x + blk.attn.proj(y)
        x = x + blk.mlp(blk.ln2(x))
    h = last.ln1(x)
    w = last.attn.qkv.weight  # rows: query, key, value
    q = F.linear(h[:, 0::2], w[:C])  # (B, L, C): queries at the key positions only
    k, v = F.linear(h, w[C:]).split(C, dim=2)  # (B, T, C) each
    y = _attention(_heads(q, nh), _heads(k, nh), _heads(v, nh), keys_only=True)  # (B, L, C)
    x = x[:, 0::2] + last.attn.proj(y)
    x = x + last.mlp(last.ln2(x))
    return model.lm_head(model.ln_final(x))  # (B, L, vocab)


def _heads(t: torch.Tensor, nh: int) -> torch.Tensor:
    B, T, C = t.shape
    return t.view(B, T, nh, C // nh).transpose(1, 2)  # (B, nh, T, hs)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, keys_only: bool) -> torch.Tensor:
    """Causal attention of queries ``q`` (B, nh, Tq, hs) at positions ``0..T-1`` (or at ``0, 2, ...`` when
    ``keys_only``) over ``k``, ``v`` (B, nh, T, hs); returns (B, Tq, nh * hs)."""
    B, nh, Tq, hs = q.shape
    T = k.shape[2]
    allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if keys_only:
        allowed = allowed[0::2]  # (Tq, T)
    if q.device.type == "cpu":
        bias = torch.zeros(Tq, T, device=q.device).masked_fill_(~allowed, float("-inf"))
        att = torch.baddbmm(
            bias.expand(B * nh, Tq, T),
            q.reshape(B * nh, Tq, hs),
            k.reshape(B * nh, T, hs).transpose(1, 2),
            alpha=1.0 / math.sqrt(hs),
        ).softmax(dim=-1)  # (B*nh, Tq, T)
        y = torch.bmm(att, v.reshape(B * nh, T, hs)).view(B, nh, Tq, hs)
    elif keys_only:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    else:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return y.transpose(1, 2).reshape(B, Tq, nh * hs)
