"""The one learning-rate schedule and the one AdamW factory that lab's own training loops share, and what an
optimizer's state costs in memory.

Transformers' ``Trainer`` (LoRA) has its own scheduler (``lr_scheduler_type``); these serve the loops written
here (character-level pretraining and the wind tunnel), as nanoGPT's ``get_lr`` and ``configure_optimizers``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, total: int, ramp: int | None = None) -> float:
    """Learning rate at ``step`` (0-based):

    1. linear warmup for ``step < warmup``: ``lr * (step + 1) / ramp``. ``ramp`` defaults to ``warmup + 1``
       (nanoGPT's ``get_lr``: the peak is reached one step after warmup); ``ramp=warmup`` reaches it on the last
       warmup step (the wind tunnel's recipe).
    2. cosine decay from ``lr`` to ``min_lr`` between ``warmup`` and ``total``;
    3. ``min_lr`` after ``total``.
    """
    if step < warmup:
        return lr * (step + 1) / (warmup + 1 if ramp is None else ramp)
    ratio = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def adamw(
    params: Iterable[torch.nn.Parameter],
    *,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    fused: bool = False,
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings (``dim >= 2``) only, nanoGPT's grouping.

    Tied parameters are counted once; ``fused`` selects torch's fused kernel (same maths, other rounding).
    """
    unique = list({id(p): p for p in params if p.requires_grad}.values())
    groups = [
        {"params": [p for p in unique if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in unique if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def optimizer_state_bytes(params: list[torch.nn.Parameter], kind: str) -> int:
    """Bytes of optimizer state after one step on random gradients: ``"adamw"`` (torch, fp32 moments) or
    ``"adamw8bit"`` (bitsandbytes' 8-bit moments). The gradients are cleared again afterwards."""
    if kind == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-4)
    else:
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, lr=1e-4)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    total = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    for p in params:
        p.grad = None
    return int(total)
