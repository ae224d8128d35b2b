"""The TopK-sparse transcoder step: a circuit-tracer ``SingleLayerTranscoder`` (TopK activation) trained with
gradients only through each token's ``k`` active features.

Dense, the step costs five ``tokens x d_model x d_transcoder`` matmuls (encoder forward, decoder forward, the
decoder's two backward products, the encoder's weight gradient), although TopK zeroes all but ``k`` of the
``d_transcoder`` activations. Here only the encoder forward is dense (it scores every feature to choose ``k``);
everything after the choice touches ``k`` rows per token:

- decoder: ``y_hat = sum_j a_j W_dec[f_j] + b_dec`` with ``torch.nn.functional.embedding_bag`` (the activations as
  per-sample weights);
- backward, written out (:class:`SparseTopKStep`): the activations' gradients ``W_dec[f] . g[t]`` with
  ``torch.sparse.sampled_addmm`` (the dense product evaluated only at the choices), both weight gradients as one
  sparse (CSR) times dense product each, ``S^T x`` and ``S^T g``, over the choices grouped by feature
  (:class:`FeatureRows`), written into gradient buffers kept between steps; then one fused Adam over every layer.

With ``select="bf16"`` the encoder matmul runs in bf16 and its scores are the activations (rounded to bf16, then
fp32 on); everything after is fp32. With ``select="fp32"`` the step is the dense step's arithmetic up to float
summation order (``tests/test_speed_transcoders.py`` holds it to that).

Measured on this machine's 2 cores (SmolLM2's 30 layers, 2304 features, TopK 32, 512 tokens; ``lab bench
transcoder``): the dense fp32 step ~50 ms per layer, this one ~13: the bf16 encoder matmul ~4 ms (at the bf16 matmul
peak, which here is only ~2.2x fp32's: the processors have AVX-512 bf16 but no AMX), the two TopKs ~1.8, Adam
~1.5 (memory-bound), the sparse products ~3.

Why written here: circuit-tracer has no trainer. EleutherAI's sparsify (``FusedEncoder`` in
``sparsify/fused_encoder.py``) has the same idea, but its sparse decoder is a Triton kernel (GPU only; on CPU an
eager fallback), its encoder backward materialises a ``tokens x k x d_model`` tensor for ``index_add_`` (measured
here: 14-28 ms at 512 tokens, k 32, d 576, against under 1 ms for the CSR product), its TopK has a ReLU in front
(circuit-tracer's ``TopK`` has none, so the trained modules would not be the ones attribution runs) and it trains
its own ``SparseCoder`` format. Everything below is PyTorch's own operators, eager.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

SELECT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RADIX_FROM = 32768  # entries from which torch.sort uses its radix sort on 1-D integers (aten SortingKernel)


@functools.lru_cache
def _group_width(n: int, k: int) -> int | None:
    """The number of groups ``G`` for :func:`topk_indices` (a divisor of ``n`` near sqrt(k n), which balances its
    two TopKs), or None where no divisor helps."""
    widths = [g for g in range(k, n + 1) if n % g == 0 and g * g <= 2 * k * n]
    return widths[-1] if widths and widths[-1] * 2 <= n else None


def topk_indices(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's ``k`` largest entries' columns (as ``pre.topk(k).indices``, as a set; ties aside), from two narrow
    TopKs instead of one wide one (512 rows of 2304: ~1.8 ms against ~2.7 ms here, where ``torch.topk``'s cost is
    per row and per entry).

    The columns are dealt into ``G`` interleaved groups (group ``g``: columns ``g, g + G, g + 2G, ...``); the ``k``
    groups with the largest maxima hold the row's top ``k`` (a top-k entry outside them would be beaten by those
    ``k`` maxima), so a TopK over the ``G`` group maxima and one over those groups' ``k * n / G`` entries finish it.
    """
    tokens, n = pre.shape
    g = _group_width(n, k)
    if g is None:
        return pre.topk(k, dim=-1, sorted=False).indices
    dealt = pre.view(tokens, n // g, g)  # [tokens, n / G, G]
    best = dealt.amax(1).topk(k, dim=-1, sorted=False).indices  # [tokens, k] the groups with the largest maxima
    inside = dealt.gather(2, best[:, None, :].expand(tokens, n // g, k)).view(tokens, -1)  # [tokens, n / G * k]
    j = inside.topk(k, dim=-1, sorted=False).indices
    return best.gather(1, j % k) + g * torch.div(j, k, rounding_mode="floor")


class FeatureRows:
    """A batch's choice grouped by feature: the CSR pattern of the (n_features, tokens) matrix whose row ``f`` holds
    the tokens that chose feature ``f`` — the shape of both weight gradients, ``S^T m``. Entries are listed in that
    feature order throughout (``in_order`` puts a (tokens, k) tensor in it)."""

    def __init__(self, idx: torch.Tensor, n_features: int):
        tokens, k = idx.shape
        flat = idx.reshape(-1)
        # the (token, slot) pairs sorted by feature, tokens ascending within one (stable). PyTorch sorts 1-D integers
        # by radix from 32768 entries on (int32: ~3.5x faster than its comparison sort at 16384), hence the padding
        # past the last feature.
        pad = torch.full((max(0, RADIX_FROM - flat.numel()),), n_features, dtype=flat.dtype)
        ordered = torch.cat([flat, pad]).to(torch.int32 if n_features < 2**31 else torch.long).sort(stable=True)
        self.order, self.feature = ordered.indices[: flat.numel()], ordered.values[: flat.numel()].long()
        self.token = torch.div(self.order, k, rounding_mode="floor")
        self.crow = torch.zeros(n_features + 1, dtype=torch.long)
        self.crow[1:] = torch.bincount(flat, minlength=n_features).cumsum(0)
        self.shape = (n_features, tokens)

    def in_order(self, values: torch.Tensor) -> torch.Tensor:
        return values.reshape(-1)[self.order]

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        """``S``: the sparse (n_features, tokens) matrix holding ``values`` (in feature order) at the choices."""
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(self.crow, self.token, values, self.shape)

    def sampled(self, w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """``w[f] . m[t]`` for every choice (f, t), in feature order: ``w @ m.T`` evaluated only there."""
        zeros = self.matrix(torch.zeros(self.order.numel(), dtype=m.dtype))
        return torch.sparse.sampled_addmm(zeros, w, m.t(), beta=0.0).values()

    def scatter(self, values: torch.Tensor, m: torch.Tensor, out: torch.Tensor, add: bool = False) -> torch.Tensor:
        """``out[f] = sum over the tokens t that chose f of value * m[t]`` (``S^T m``), written into ``out`` (added
        to it with ``add``)."""
        return torch.addmm(out, self.matrix(values), m, beta=1.0 if add else 0.0, out=out)


def normalised_mse(y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The training loss: sum |y - y_hat|^2 / sum |y - mean(y)|^2 over the batch (the batch's FVU)."""
    return ((y_hat - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()


def dense_loss_and_grads(tc, x: torch.Tensor, y: torch.Tensor) -> float:
    """The reference: circuit-tracer's own dense ``forward`` and autograd; sets ``tc``'s gradients, returns the
    loss."""
    loss = normalised_mse(tc(x), y)
    for prm in tc.parameters():
        prm.grad = None
    loss.backward()
    return loss.item()


class SparseTopKStep:
    """The same loss and gradients as :func:`dense_loss_and_grads`, through the ``k`` chosen features only.

    The backward is written out (the loss's gradient ``2 (y_hat - y) / sum |y - mean(y)|^2`` is one line) rather
    than left to autograd so that it can write into gradient buffers kept from step to step: a fresh 2304 x 576
    gradient costs ~0.9 ms in page faults here, more than the sparse product that fills it.

    A transcoder with a skip connection (circuit-tracer's ``W_skip``: ``y_hat += x @ W_skip.T``) gets that dense
    term and its gradient too. ``auxk_alpha > 0`` adds the AuxK loss of Gao et al. (2024, appendix B.1), as
    EleutherAI's sparsify computes it: the features that have not fired for ``dead_tokens`` training tokens are
    "dead"; each token's ``k_aux = d_model / 2`` highest-scoring dead features (fewer when fewer are dead) decode the
    main reconstruction's residual, and ``auxk_alpha * min(dead / k_aux, 1) * |e_hat - e|^2 / sum |y - mean(y)|^2``
    is added to the loss, so that dead features learn to point where the live ones miss. ``aux_tokens`` (None: all)
    computes it on that many of the batch's tokens (an evenly spaced subset) to bound its cost, which grows with
    ``k_aux``. The returned loss is the reconstruction's (the batch FVU) alone; :attr:`last_aux` holds the AuxK term.
    """

    def __init__(
        self,
        tc,
        select: str = "bf16",
        *,
        auxk_alpha: float = 0.0,
        dead_tokens: int = 50_000,
        aux_tokens: int | None = None,
    ):
        self.tc, self.k, self.dtype = tc, tc.activation_function.k, SELECT_DTYPES[select]
        for prm in tc.parameters():
            prm.grad = torch.zeros_like(prm)  # overwritten by every step, so no zero_grad between steps
        self.w_enc = torch.empty_like(tc.W_enc, dtype=self.dtype) if self.dtype != torch.float32 else None
        low = self.dtype != torch.float32 and tc.W_skip is not None
        self.w_skip = torch.empty_like(tc.W_skip, dtype=self.dtype) if low else None
        self.auxk_alpha, self.dead_tokens, self.aux_tokens = auxk_alpha, dead_tokens, aux_tokens
        # training tokens since each feature last fired (the dead-feature clock; part of a resumable checkpoint)
        self.since_fired = torch.zeros(tc.W_dec.shape[0], dtype=torch.long)
        self.last_aux = 0.0

    def state_dict(self) -> dict:
        return {"since_fired": self.since_fired.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.since_fired.copy_(state["since_fired"])

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> float:
        tc = self.tc
        if self.w_enc is None:
            pre = F.linear(x, tc.W_enc, tc.b_enc)  # [tokens, n_features]: circuit-tracer's encode, exactly
        else:  # the bias added after the product: addmm's broadcast copy of it into the output costs more
            pre = (x.to(self.dtype) @ self.w_enc.copy_(tc.W_enc).t()).add_(tc.b_enc.to(self.dtype))
        dead = self.since_fired >= self.dead_tokens  # dead before this batch (the AuxK set)
        idx = topk_indices(pre, self.k)  # [tokens, k] chosen features
        acts = pre.gather(1, idx).float()  # [tokens, k] (fp32: the dense step's very numbers)
        y_hat = F.embedding_bag(idx, tc.W_dec, per_sample_weights=acts, mode="sum") + tc.b_dec  # [tokens, d_model]
        if tc.W_skip is not None:  # in the choosing format too (bf16: 576 x 576 is ~40 % of the encoder's work)
            x_sel = x.to(self.dtype) if self.w_skip is not None else x
            w_skip = self.w_skip.copy_(tc.W_skip) if self.w_skip is not None else tc.W_skip
            y_hat.add_(x_sel @ w_skip.t())
        residual = y_hat.sub_(y)
        total = ((y - y.mean(0)) ** 2).sum()
        loss = (residual**2).sum() / total
        grad = residual.mul_(2 / total)  # d loss / d y_hat
        choice = FeatureRows(idx, tc.W_dec.shape[0])
        grad_acts = choice.sampled(tc.W_dec, grad)  # d loss / d a = W_dec[f] . grad[t], in feature order
        choice.scatter(grad_acts, x, out=tc.W_enc.grad)  # a = W_enc[f] . x[t] + b_enc[f]
        choice.scatter(choice.in_order(acts), grad, out=tc.W_dec.grad)
        tc.b_enc.grad.zero_().index_add_(0, choice.feature, grad_acts)
        torch.sum(grad, 0, out=tc.b_dec.grad)
        if tc.W_skip is not None:
            if self.w_skip is None:
                torch.mm(grad.t(), x, out=tc.W_skip.grad)
            else:
                tc.W_skip.grad.copy_(grad.to(self.dtype).t() @ x_sel)
        self.last_aux = 0.0
        if self.auxk_alpha > 0 and (n_dead := int(dead.sum())) > 0:
            # grad is 2 (y_hat - y) / total = -2 e / total, so the residual e = -grad * total / 2
            self.last_aux = self._auxk(pre, x, grad, total, dead, n_dead)
        self.since_fired += x.shape[0]
        self.since_fired[idx.reshape(-1)] = 0
        return loss.item()

    def _auxk(self, pre, x, grad, total, dead, n_dead: int) -> float:
        tc = self.tc
        if self.aux_tokens is not None and self.aux_tokens < x.shape[0]:
            rows = torch.linspace(0, x.shape[0] - 1, self.aux_tokens).round().long()
            pre, x, grad = pre[rows], x[rows], grad[rows]
        k_aux = x.shape[-1] // 2
        scale = min(n_dead / k_aux, 1.0) * self.auxk_alpha
        k_aux = min(k_aux, n_dead)
        scores = pre.masked_fill(~dead, float("-inf"))
        idx = scores.topk(k_aux, dim=-1, sorted=False).indices
        acts = pre.gather(1, idx).float()
        e = grad * (-total / 2)  # the main reconstruction's residual y - y_hat (a constant of this loss)
        diff = F.embedding_bag(idx, tc.W_dec, per_sample_weights=acts, mode="sum").sub_(e)  # e_hat - e
        aux = float((diff**2).sum() / total) * scale
        g = diff.mul_(2 * scale / total)
        choice = FeatureRows(idx, tc.W_dec.shape[0])
        grad_acts = choice.sampled(tc.W_dec, g)
        choice.scatter(grad_acts, x, out=tc.W_enc.grad, add=True)
        choice.scatter(choice.in_order(acts), g, out=tc.W_dec.grad, add=True)
        tc.b_enc.grad.index_add_(0, choice.feature, grad_acts)
        return aux


def loss_and_grads(tc, *, sparse: bool, select: str = "fp32", **auxk) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """The function that, given a batch ``(x, y)``, sets ``tc``'s gradients of :func:`normalised_mse` and returns
    the loss: the dense reference (``sparse=False``) or :class:`SparseTopKStep` choosing in ``select``'s format
    (``auxk``: its AuxK settings)."""
    if not sparse and auxk.get("auxk_alpha", 0.0) > 0:
        raise ValueError("the dense reference step has no AuxK loss: use sparse=True")
    return SparseTopKStep(tc, select, **auxk) if sparse else partial(dense_loss_and_grads, tc)


def optimizers(transcoders: list, lr: float, *, sparse: bool) -> list[torch.optim.Adam]:
    """Adam on the transcoders' parameters. Sparse path: one fused CPU Adam over every layer (one kernel pass per
    tensor, ~6x faster here than the default per-tensor loop, and one Python call per step instead of one per
    layer). Dense reference: one default Adam per layer, as the build had. The updates are the same either way,
    up to float rounding: Adam is per element."""
    if sparse:
        return [torch.optim.Adam([p for tc in transcoders for p in tc.parameters()], lr=lr, fused=True)]
    return [torch.optim.Adam(tc.parameters(), lr=lr) for tc in transcoders]
