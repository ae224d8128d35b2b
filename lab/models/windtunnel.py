"""The wind tunnel's networks: lab's GPT (TransformerLens hook names) and the paper's controls, a context-blind
MLP and an LSTM, sized to match a transformer's parameter count."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

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
