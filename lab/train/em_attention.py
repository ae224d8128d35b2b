"""Paper II of the wind-tunnel series ("Gradient Dynamics of Attention: How Cross-Entropy Sculpts Bayesian
Manifolds", arXiv:2512.22473): one causal attention head learns to predict a sticky Markov chain, and an "EM-like"
schedule (the value matrix on a 10x larger learning rate, the authors' M-step) reaches plain SGD's final loss in
fewer steps. Set up as the authors' code does (github.com/vishalmisra/bayesian-wind-tunnel,
``experiments/paper2_gradient/em_vs_sgd_multiseed.py``):

- 8 symbols; the chain stays with probability ``self_prob`` (0.3) and otherwise moves to symbol j with weight
  1/(circular distance to j). (Their code normalises so that the diagonal ends near 0.35; ours is exactly 0.3.)
- One sequence of T = 2000 symbols, trained full-batch; the input at t is ``mu[y_{t-1}] + N(0, I)`` in 20
  dimensions (fixed random ``mu``), the target is ``y_t``.
- One head: queries and keys of width 10, values 15, an output map to the 8 logits, weights initialised at 0.1x a
  standard normal, no normalisation or MLP.
- SGD at learning rate 0.01 for 1000 steps against the same gradients with the value matrix at 0.1. "Steps to
  converge" is the first step at which the EM-like run's loss is below SGD's loss at its last step.

Written here rather than with ``torch.optim.SGD`` parameter groups only because the whole experiment is four
matrices; the update is plain gradient descent either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import torch
import torch.nn.functional as F

from lab.errors import LabError


@dataclass(frozen=True)
class EMConfig:
    n_symbols: int = 8
    self_prob: float = 0.3
    T: int = 2000
    d_x: int = 20
    d_k: int = 10
    d_v: int = 15
    steps: int = 1000
    lr: float = 0.01  # SGD, every matrix
    value_lr: float = 0.1  # the EM-like schedule's value matrix
    init_scale: float = 0.1
    log_every: int = 10

    def __post_init__(self) -> None:
        if not 0 < self.self_prob < 1 or self.n_symbols < 2 or self.T < 2 or self.steps < 1:
            raise LabError(f"bad EM-vs-SGD config: {self}")


def sticky_chain(n: int, self_prob: float) -> torch.Tensor:
    """The transition matrix (n, n): ``self_prob`` on the diagonal, the rest spread by 1/(circular distance)."""
    i = torch.arange(n)
    d = (i[:, None] - i[None, :]).abs()
    d = torch.minimum(d, n - d).double()
    w = torch.where(d > 0, 1.0 / d.clamp_min(1), torch.zeros_like(d))
    return w / w.sum(1, keepdim=True) * (1 - self_prob) + torch.eye(n, dtype=torch.float64) * self_prob


def chain_entropy_nats(P: torch.Tensor) -> float:
    """The authors' ``H_min``: the mean over states of the next-symbol entropy (nats), the loss of the true chain
    when the current symbol is known."""
    return float(-(P * P.clamp_min(1e-300).log()).sum(1).mean())


def make_task(cfg: EMConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs (T, d_x), targets (T,), the transition matrix) of one seed."""
    g = torch.Generator().manual_seed(seed)
    P = sticky_chain(cfg.n_symbols, cfg.self_prob)
    y = torch.empty(cfg.T + 1, dtype=torch.long)
    y[0] = torch.randint(cfg.n_symbols, (1,), generator=g)
    u = torch.rand(cfg.T, generator=g, dtype=torch.float64)
    cdf = P.cumsum(1)
    for t in range(cfg.T):
        y[t + 1] = int((cdf[y[t], :-1] < u[t]).sum())
    mu = torch.randn(cfg.n_symbols, cfg.d_x, generator=g)
    x = mu[y[:-1]] + torch.randn(cfg.T, cfg.d_x, generator=g)
    return x, y[1:], P


def init_head(cfg: EMConfig, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    shapes = {
        "W_Q": (cfg.d_x, cfg.d_k),
        "W_K": (cfg.d_x, cfg.d_k),
        "W_V": (cfg.d_x, cfg.d_v),
        "W_O": (cfg.d_v, cfg.n_symbols),
    }
    return {k: (torch.randn(*s, generator=g) * cfg.init_scale).requires_grad_() for k, s in shapes.items()}


def head_loss(w: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats) of the causal single head's next-symbol predictions."""
    q, k, v = (x @ w[name] for name in ("W_Q", "W_K", "W_V"))
    mixed = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]  # softmax(qk^T/sqrt(d_k)) v
    return F.cross_entropy(mixed @ w["W_O"], y)


def train_head(cfg: EMConfig, seed: int, value_lr: float) -> list[float]:
    """The loss before every step and after the last (``steps + 1`` values) of full-batch gradient descent with
    ``value_lr`` on ``W_V`` and ``cfg.lr`` on the rest."""
    x, y, _ = make_task(cfg, seed)
    w = init_head(cfg, seed)
    losses = []
    for _ in range(cfg.steps):
        loss = head_loss(w, x, y)
        losses.append(loss.item())
        grads = torch.autograd.grad(loss, list(w.values()))
        with torch.no_grad():
            for (name, p), g in zip(w.items(), grads, strict=True):
                p -= (value_lr if name == "W_V" else cfg.lr) * g
    with torch.no_grad():
        losses.append(head_loss(w, x, y).item())
    return losses


def em_vs_sgd(cfg: EMConfig, seeds: tuple[int, ...]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Per seed: SGD's final loss, the step at which the EM-like schedule first gets below it, and the speed-up;
    and both loss curves (every ``log_every`` steps)."""
    rows, curves = [], []
    for seed in seeds:
        sgd = train_head(cfg, seed, cfg.lr)
        em = train_head(cfg, seed, cfg.value_lr)
        target = sgd[-1]
        hit = next((i for i, v in enumerate(em) if v < target), None)
        rows.append(
            {
                "seed": seed,
                "sgd_steps": cfg.steps,
                "sgd_final_loss": target,
                "em_final_loss": em[-1],
                "em_steps_to_sgd_final": hit,
                "speedup": cfg.steps / hit if hit else None,
                "h_min_nats": chain_entropy_nats(sticky_chain(cfg.n_symbols, cfg.self_prob)),
                "initial_loss": sgd[0],
            }
        )
        for method, losses in (("SGD", sgd), ("EM-like", em)):
            curves += [
                {"seed": seed, "method": method, "step": i, "loss": v}
                for i, v in enumerate(losses)
                if i % cfg.log_every == 0 or i == cfg.steps
            ]
    return pl.DataFrame(rows), pl.DataFrame(curves)


def speedup(per_seed: pl.DataFrame) -> float:
    """The speed-up as the authors compute it from :func:`em_vs_sgd`'s per-seed rows: SGD's steps over the EM-like
    schedule's mean steps to SGD's final loss (a seed that never gets there counts SGD's steps)."""
    steps = per_seed["em_steps_to_sgd_final"].fill_null(per_seed["sgd_steps"])
    return float(per_seed["sgd_steps"][0] / steps.mean())
