"""Benchmark (not a test): one attribution graph traced with the lab's first settings (batch 64) and with today's
(batch :data:`lab.interp.circuits.BATCH_SIZE`), alternated in one process — the speed suite's ``attribution`` row.

The graph is the same both ways (``circuits.trace`` holds the re-ranking schedule fixed), and the measurement says
so in its note. The transcoders are circuit-tracer's ``SingleLayerTranscoder`` at the circuits track's cpu shape
(2304 features, TopK 32, every layer) with random weights (``lab.interp.transcoders.new_transcoder``): a TopK
transcoder fires exactly k features per token whether trained or not, so the graph's size and the time it takes
depend on the shapes only, and the benchmark needs no 23-minute transcoder build. Target: 1.5x.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from lab.bench.speed import Measurement, alternate
from lab.data.constraints import graph_prompts
from lab.errors import LabError
from lab.interp import circuits
from lab.interp.transcoders import TranscoderConfig, new_transcoder
from lab.models.loading import load_model
from lab.profiles import Profile

# per profile: transcoder width, TopK k, feature nodes per graph (the circuits track's recipes)
SHAPES = {"smoke": (128, 8, 100), "cpu": (2304, 32, 300)}
BASELINE_BATCH = 64  # what the lab traced with before (and circuit-tracer's re-ranking every 4 batches of it)
SEED_PROMPT = "Write a poem about trees"  # graph_prompts needs one; the timed prompt is the first held-out one


def random_transcoders(n_layers: int, d_model: int, d_transcoder: int, k: int, seed: int = 0):
    """A circuit-tracer ``TranscoderSet`` (MLP in -> MLP out, as ``lab.interp.transcoders.load_transcoders``
    builds) of untrained TopK transcoders with ``new_transcoder``'s initialisation."""
    from circuit_tracer.transcoder import TranscoderSet

    cfg = TranscoderConfig(d_transcoder=d_transcoder, k=k, steps=1, batch_seqs=1, seq_len=1, lr=1e-3, eval_seqs=1)
    gen = torch.Generator().manual_seed(seed)
    layers = {layer: new_transcoder(d_model, cfg, layer, gen) for layer in range(n_layers)}
    return TranscoderSet(layers, feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out", scan="random")


def same_graph(a, b) -> tuple[bool, float]:
    """Whether two circuit-tracer graphs selected the same features, and their adjacency's largest difference."""
    same = torch.equal(a.selected_features, b.selected_features)
    diff = float((a.adjacency_matrix - b.adjacency_matrix).abs().max()) if same else float("inf")
    return same, diff


def measure(profile: Profile, *, repeats: int = 5) -> Measurement:
    """The speed suite's ``attribution`` row: one held-out constraint prompt's graph (followed at its concept's
    token) traced at batch 64 and at the fast batch, alternated ``repeats`` times after one untimed round, on the
    profile's model (smoke: the tiny Llama; cpu: SmolLM2-135M) with random transcoders of the recipe's shape."""
    if profile.name not in SHAPES:
        raise LabError(
            f"the attribution benchmark runs on {', '.join(SHAPES)} (got profile {profile.name!r}): the gpu recipe "
            f"traces Gemma-2-2B with GemmaScope's transcoders from the hub"
        )
    d_transcoder, k, max_nodes = SHAPES[profile.name]
    fast_batch = circuits.BATCH_SIZE["cpu"]
    lm = load_model(profile)
    cfg = lm.model.config
    n_params = sum(p.numel() for p in lm.model.parameters())
    transcoders = random_transcoders(cfg.num_hidden_layers, cfg.hidden_size, d_transcoder, k)
    prompt = next(p for p in graph_prompts(lm.tokenizer, [SEED_PROMPT], 1, 1) if p["target_id"] is not None)
    graphs: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = circuits.replacement_model(
            circuits.export_model(lm.model, lm.tokenizer, Path(tmp) / "model"), transcoders
        )
        del lm

        def call(name: str, batch: int):
            def run() -> None:
                _, graphs[name] = circuits.trace(
                    model, prompt["text"], target_id=prompt["target_id"], max_feature_nodes=max_nodes, batch_size=batch
                )

            return run

        times = alternate(
            {"baseline": call("baseline", BASELINE_BATCH), "fast": call("fast", fast_batch)}, repeats=repeats
        )
    same, diff = same_graph(graphs["baseline"], graphs["fast"])
    g = graphs["fast"]
    return Measurement(
        workload="attribution",
        baseline=f"circuit-tracer attribute, batch {BASELINE_BATCH}, fp32",
        fast=f"circuit-tracer attribute, batch {fast_batch} (same re-ranking schedule), fp32",
        tokens_per_call=int(g.n_pos),
        baseline_s=times["baseline"],
        fast_s=times["fast"],
        # one forward pass (2N per token): a floor of what a graph computes (its MFU is a lower bound)
        flops_per_token=2.0 * n_params,
        fast_dtype="fp32",
        target=1.5,
        note=(
            f"one graph a call: {g.n_pos} tokens, {int(g.active_features.shape[0])} active features, "
            f"{len(g.selected_features)} attributed; {d_transcoder} features TopK {k} per layer, random weights; "
            f"same graph both ways: {'yes' if same else 'NO'} (largest adjacency difference {diff:.2g})"
        ),
    )
