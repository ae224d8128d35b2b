"""Benchmarks (not tests): the speed suite's ``transcoder`` row (one training step of every layer's transcoder,
target 4x) and its ``harvest`` row (the forward pass that collects every layer's MLP input and output, target 2x),
each alternated in one process against today's path on the same work.

- ``transcoder``: ``TranscoderConfig(sparse=False, precision="fp32")`` — circuit-tracer's dense forward, autograd,
  Adam's default loop — against the default ``sparse=True, precision="bf16"`` (``lab.interp.topk``): one step of
  every layer on one harvested batch of the profile's model, at the circuits track's recipe shape (cpu: SmolLM2-135M,
  30 layers, 2304 features, TopK 32, 8 x 64 tokens). Both paths start from the same weights and step on the same
  batch, so their losses after the timed calls are comparable; the note carries them.
- ``harvest``: today's fp32 forward through the whole model (``full_forward=True``) against the bf16 autocast
  forward that stops after the last layer, with the layers' weights held in bf16 as the build holds them; the note
  carries how far bf16 moves the activations (relative error, and as the FVU floor it would put under a perfect
  transcoder).
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import replace

import torch

from lab.bench.speed import Measurement, alternate
from lab.data.corpus import load_corpus
from lab.errors import LabError
from lab.interp import topk
from lab.interp.harvest import bf16_layer_weights, harvest_precision, mlp_activations
from lab.interp.transcoders import TranscoderConfig, new_transcoder, token_sequences, training_texts, unit_scale
from lab.models.loading import load_model
from lab.profiles import Profile

# per profile, the circuits track's transcoder recipe shape (steps and lr do not enter one timed step)
RECIPES = {
    "smoke": TranscoderConfig(d_transcoder=128, k=8, steps=1, batch_seqs=8, seq_len=32, lr=3e-3, eval_seqs=8),
    "cpu": TranscoderConfig(d_transcoder=2304, k=32, steps=1, batch_seqs=8, seq_len=64, lr=5e-3, eval_seqs=8),
}
BASELINE = {"sparse": False, "precision": "fp32"}  # today's step


def _recipe(profile: Profile) -> TranscoderConfig:
    if profile.name not in RECIPES:
        raise LabError(
            f"the transcoder benchmarks run on {', '.join(RECIPES)} (got profile {profile.name!r}): the gpu recipe "
            f"loads GemmaScope's transcoders from the hub instead of training its own"
        )
    return RECIPES[profile.name]


def _batch(profile: Profile, cfg: TranscoderConfig):
    """The profile's model (frozen) and one training batch of its transcoder text (BOS + seq_len tokens each)."""
    lm = load_model(profile)
    model = lm.model.eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    train, _ = training_texts(lm.tokenizer, load_corpus(profile))
    return model, token_sequences(lm.tokenizer, train, cfg.seq_len, cfg.batch_seqs, cfg.seed)


def measure(profile: Profile, *, repeats: int = 5) -> Measurement:
    """The ``transcoder`` row: one Adam step of all layers' transcoders on one batch, dense fp32 against sparse."""
    return compare(profile, repeats=repeats)[0]


def compare(profile: Profile, *, repeats: int = 5) -> tuple[Measurement, dict[str, list[float]]]:
    """:func:`measure`'s row and each path's per-layer losses at its last call (both paths have then taken the same
    number of steps from the same weights on the same batch)."""
    cfg = _recipe(profile)
    model, ids = _batch(profile, cfg)
    ins, outs = mlp_activations(model, ids)  # fp32, the same batch for both paths, in training units
    batch = [(x / unit_scale(x), y / unit_scale(y)) for x, y in zip(ins, outs, strict=True)]
    d_model, n_layers = ins[0].shape[1], len(ins)
    losses: dict[str, list[float]] = {}

    def path(c: TranscoderConfig):
        gen = torch.Generator().manual_seed(cfg.seed)
        tcs = [new_transcoder(d_model, c, layer, gen) for layer in range(n_layers)]  # the same weights both ways
        steps = [topk.loss_and_grads(tc, sparse=c.sparse, select=c.precision) for tc in tcs]
        opts = topk.optimizers(tcs, c.lr, sparse=c.sparse)
        name = "sparse" if c.sparse else "dense"

        def call() -> None:  # as the build's loop: every layer's gradients, then the Adam steps
            losses[name] = [step(x, y) for step, (x, y) in zip(steps, batch, strict=True)]
            for opt in opts:
                opt.step()

        return name, call

    paths = dict(path(c) for c in (replace(cfg, **BASELINE), cfg))
    times = alternate(paths, repeats=repeats)
    dense, sparse = statistics.mean(losses["dense"]), statistics.mean(losses["sparse"])
    row = Measurement(
        workload="transcoder",
        baseline="fp32 dense step (circuit-tracer forward, autograd, Adam loop)",
        fast=f"TopK-sparse step, {cfg.precision} feature choice, fused Adam",
        tokens_per_call=ids.shape[0] * cfg.seq_len,
        baseline_s=times["dense"],
        fast_s=times["sparse"],
        # the step's necessary work per token and layer: the encoder's dense scores (2 d n) and four k-row products
        # (decoder forward; the activations' and both weight matrices' gradients: 2 k d each)
        flops_per_token=n_layers * (2 * d_model * cfg.d_transcoder + 8 * cfg.k * d_model),
        fast_dtype=cfg.precision,
        target=4.0,
        note=(
            f"{n_layers} layers x {cfg.d_transcoder} features, TopK {cfg.k}, {ids.shape[0]}x{cfg.seq_len} tokens, "
            f"one step of every layer per call; mean loss after {repeats + 1} steps from the same weights on the "
            f"same batch: dense {dense:.4f}, sparse {sparse:.4f}"
        ),
    )
    return row, losses


def activation_shift(fast: list[torch.Tensor], ref: list[torch.Tensor]) -> tuple[float, float]:
    """How far ``fast`` activations are from ``ref`` per layer (means over layers): relative error |d| / |ref|,
    and |d|^2 / sum |ref - mean(ref)|^2 — the FVU a perfect transcoder of ``ref`` would show on ``fast``."""
    rel = [float((a - b).norm() / b.norm()) for a, b in zip(fast, ref, strict=True)]
    floor = [float(((a - b) ** 2).sum() / ((b - b.mean(0)) ** 2).sum()) for a, b in zip(fast, ref, strict=True)]
    return statistics.mean(rel), statistics.mean(floor)


def measure_harvest(profile: Profile, *, repeats: int = 5) -> Measurement:
    """The ``harvest`` row: every layer's MLP input and output of one training batch, fp32 whole-model forward
    against the bf16 autocast forward that stops after the last layer."""
    cfg = _recipe(profile)
    model, ids = _batch(profile, cfg)
    got: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    def baseline() -> None:
        got["fp32"] = mlp_activations(model, ids, full_forward=True)

    def fast() -> None:
        with harvest_precision("bf16"):
            got["bf16"] = mlp_activations(fast_model, ids)

    with bf16_layer_weights(copy.deepcopy(model)) as fast_model:  # as the build holds them while it trains
        times = alternate({"fp32": baseline, "bf16": fast}, repeats=repeats)
    rel_in, floor_in = activation_shift(got["bf16"][0], got["fp32"][0])
    rel_out, floor_out = activation_shift(got["bf16"][1], got["fp32"][1])
    body = sum(p.numel() for p in model.model.layers.parameters())  # the matmul weights a token passes through
    return Measurement(
        workload="harvest",
        baseline="fp32 forward of the whole model (LM head included)",
        fast="bf16 autocast forward (layer weights held in bf16), stopped after the last layer",
        tokens_per_call=ids.numel(),
        baseline_s=times["fp32"],
        fast_s=times["bf16"],
        flops_per_token=2 * body,
        fast_dtype="bf16",
        target=2.0,
        note=(
            f"{ids.shape[0]}x{ids.shape[1]} tokens, {len(got['fp32'][0])} layers; bf16 moves MLP inputs by "
            f"{rel_in:.2%} and outputs by {rel_out:.2%} (relative, mean over layers), an FVU floor of "
            f"{floor_in:.1e} / {floor_out:.1e}; training batches only, held-out FVU is harvested in fp32"
        ),
    )
