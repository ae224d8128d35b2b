"""The HMM wind tunnel of "The Bayesian Geometry of Transformer Attention" (arXiv:2512.22471), as the authors'
code builds it (github.com/vishalmisra/bayesian-wind-tunnel, ``src/data/hmm.py``): every sequence draws its own
hidden Markov model, the model reads that HMM and a run of observations, and at each observation predicts the
filtering posterior over the hidden state, p(s_t | o_1..o_t), whose exact value the forward algorithm gives.

- **HMMs**: 5 states, 5 symbols; each row of the transition matrix T and emission matrix E is Dirichlet(1), floored
  at 0.05, renormalised and rounded to hundredths (rows still sum to 1); the initial state is uniform. The model
  sees the rounded matrices and the posterior is computed from those same matrices.
- **Tokens**: ``[TRANS] T11..T55 [EMIT] E11..E55 [SEP] o1 .. oK`` with each probability one token (0.00..1.00 in
  hundredths: 101 ids). The authors also put an ``[OBS]`` marker before every symbol; we leave it out, which halves
  the sequence and changes nothing the model can know. The posterior is read at the observation tokens.
- **Metrics** (bits): KL(posterior || model) and the entropy MAE |H_model - H_Bayes|, both per (sequence, position)
  then averaged. The authors' README quotes one number per setting without naming which; we report both.

Training at K observations and evaluating at a longer K' is their length-extrapolation test; with learned absolute
positions (theirs and ours) the positions past the training length were never trained.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from lab.data.windtunnel import LOG2E, entropy_bits
from lab.errors import LabError

N_STATES = 5
N_SYMBOLS = 5
MIN_PROB = 0.05  # the authors' floor on every probability before rounding
LEVELS = 101  # probability tokens: 0.00, 0.01, ..., 1.00
TRANS, EMIT, SEP = LEVELS, LEVELS + 1, LEVELS + 2  # marker tokens
OBS0 = LEVELS + 3  # the first observation symbol's token
VOCAB = OBS0 + N_SYMBOLS + N_STATES  # ... then one output token per hidden state (the posterior is read there)
STATE0 = OBS0 + N_SYMBOLS
HEADER = 3 + 2 * N_STATES * N_SYMBOLS  # tokens before the first observation (53)


def seq_len(K: int) -> int:
    """Tokens of a sequence with ``K`` observations."""
    return HEADER + K


@dataclass(frozen=True)
class HMMBatch:
    """Sequences of one batch: each with its own HMM.

    Attributes:
        tokens: (B, HEADER + K) model input.
        trans: (B, S, S) transition matrices (rows: from-state), as the model sees them (rounded).
        emit: (B, S, O) emission matrices (rows: state).
        obs: (B, K) observed symbols.
        states: (B, K) the hidden states that produced them.
        posterior: (B, K, S) exact filtering posterior p(s_t | o_1..o_t) under the rounded matrices.
    """

    tokens: torch.Tensor
    trans: torch.Tensor
    emit: torch.Tensor
    obs: torch.Tensor
    states: torch.Tensor
    posterior: torch.Tensor

    @property
    def K(self) -> int:
        return self.obs.shape[1]


def random_rows(n: int, rows: int, cols: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` stochastic matrices (n, rows, cols): Dirichlet(1) rows, floored at MIN_PROB, rounded to hundredths.

    Rounding keeps each row's sum at exactly 1 and every entry at the floor or above: the rounding error (a whole
    number of hundredths) goes to the row's largest entry.
    """
    e = -torch.rand(n, rows, cols, generator=generator, dtype=torch.float64).log()  # Exp(1): normalised, Dirichlet(1)
    p = (e / e.sum(-1, keepdim=True)).clamp_min(MIN_PROB)
    hundredths = torch.round(100 * p / p.sum(-1, keepdim=True)).long().clamp_min(round(100 * MIN_PROB))
    top = hundredths.argmax(-1, keepdim=True)
    hundredths.scatter_add_(-1, top, 100 - hundredths.sum(-1, keepdim=True))
    return hundredths.double() / 100


def forward_filter(trans: torch.Tensor, emit: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
    """The forward algorithm: p(s_t | o_1..o_t) for every t, (B, K, S), from a uniform initial state."""
    B, K = obs.shape
    S = trans.shape[1]
    out = torch.empty(B, K, S, dtype=torch.float64)
    prior = torch.full((B, S), 1.0 / S, dtype=torch.float64)
    for t in range(K):
        lik = emit.gather(2, obs[:, t].view(B, 1, 1).expand(B, S, 1)).squeeze(2)  # (B, S): p(o_t | s)
        post = prior * lik
        post = post / post.sum(-1, keepdim=True)
        out[:, t] = post
        prior = torch.einsum("bs,bst->bt", post, trans)  # p(s_{t+1} | o_1..o_t)
    return out


def brute_force_filter(trans: torch.Tensor, emit: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
    """p(s_t | o_1..o_t) of one HMM (S, S), (S, O) and one short run ``obs`` (K,) by summing over every hidden path
    (S^K of them): the independent check of :func:`forward_filter`."""
    S, K = trans.shape[0], obs.shape[0]
    out = torch.zeros(K, S, dtype=torch.float64)
    for t in range(K):
        for path in itertools.product(range(S), repeat=t + 1):
            p = 1.0 / S * float(emit[path[0], obs[0]])
            for i in range(1, t + 1):
                p *= float(trans[path[i - 1], path[i]]) * float(emit[path[i], obs[i]])
            out[t, path[-1]] += p
        out[t] /= out[t].sum()
    return out


def sample_hmm_batch(n: int, K: int, generator: torch.Generator | None = None) -> HMMBatch:
    """``n`` sequences, each from a fresh random HMM, with ``K`` observations."""
    if not isinstance(K, int) or K < 1:
        raise LabError(f"an HMM sequence needs at least one observation, got K={K!r}")
    trans = random_rows(n, N_STATES, N_STATES, generator)
    emit = random_rows(n, N_STATES, N_SYMBOLS, generator)
    states = torch.empty(n, K, dtype=torch.long)
    obs = torch.empty(n, K, dtype=torch.long)
    s = torch.randint(N_STATES, (n,), generator=generator)
    rows = torch.arange(n)
    u = torch.rand(n, K, 2, generator=generator, dtype=torch.float64)  # inverse-CDF draws: next state, symbol

    def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:  # (n, m) rows, (n,) uniforms -> (n,) indices
        return (probs.cumsum(-1)[:, :-1] < u[:, None]).sum(-1)

    for t in range(K):
        if t:
            s = draw(trans[rows, s], u[:, t, 0])
        states[:, t] = s
        obs[:, t] = draw(emit[rows, s], u[:, t, 1])
    level = lambda m: torch.round(m * 100).long().flatten(1)  # noqa: E731 (probabilities as tokens 0..100)
    col = lambda v: torch.full((n, 1), v, dtype=torch.long)  # noqa: E731
    tokens = torch.cat([col(TRANS), level(trans), col(EMIT), level(emit), col(SEP), obs + OBS0], dim=1)
    return HMMBatch(tokens, trans, emit, obs, states, forward_filter(trans, emit, obs))


def state_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the state tokens at the observation positions: (B, HEADER+K, VOCAB) -> (B, K, S)."""
    return logits[:, HEADER:, STATE0 : STATE0 + N_STATES].float().log_softmax(dim=-1)


def soft_cross_entropy(logp: torch.Tensor, posterior: torch.Tensor) -> torch.Tensor:
    """The authors' loss: cross-entropy of the predicted state distribution against the exact posterior (nats;
    KL to the posterior plus the posterior's own entropy, so its gradient is KL's)."""
    return -(posterior.to(logp) * logp).sum(-1).mean()


def hmm_metrics(logp: torch.Tensor, posterior: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per (sequence, position), in bits: KL(posterior || model), |H_model - H_Bayes|, and both entropies."""
    post = posterior.to(torch.float64)
    lp = logp.to(torch.float64)
    plogp = torch.where(post > 0, post * post.clamp_min(1e-300).log(), torch.zeros_like(post))
    kl = (plogp - post * lp).sum(-1) * LOG2E
    h_model, h_bayes = entropy_bits(lp), entropy_bits(post.clamp_min(1e-300).log())
    return {"kl": kl, "abs_err": (h_model - h_bayes).abs(), "h_model": h_model, "h_bayes": h_bayes}
