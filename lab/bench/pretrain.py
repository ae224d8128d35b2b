"""Benchmark (not a test): training throughput of lab's pretraining loop against a plain nanoGPT-style loop on the
same model, measured in the same run.

- :func:`run` (``lab bench pretrain`` through the track, ``results/pretrain/benchmark.parquet``): tokens/s of the
  reference loop, of the lab's training step (what ``train_gpt`` runs) on the float32 eager path and as the recipe
  trains, alternated in one process.
- :func:`measure` (the speed suite's ``pretrain`` row): the reference loop and the lab's default training step
  (:class:`lab.train.pretraining.TrainStep`: bf16 autocast, ``torch.compile``, fused AdamW) alternated in one
  process on the same model, seed and batches. Target: 1.3x.

The reference is what nanoGPT's ``train.py`` does on a CPU (``--device=cpu --compile=False``): eager float32, torch's
default AdamW, batches stacked from 2B slices, every step's loss read back.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial

import polars as pl
import torch

from lab.bench import check_counts
from lab.bench.speed import Measurement, alternate
from lab.data.corpus import Corpus, load_corpus
from lab.models.gpt import GPT
from lab.models.tokenizer import CharTokenizer
from lab.profiles import Profile
from lab.train.pretraining import PretrainConfig, get_batch, gpt_config, new_training

# the speed suite's recipe per profile: nanoGPT's CPU recipe as the lab trains it (the library defaults + compile);
# smoke: a 2-layer model, eager (compiling would take longer than the seconds smoke has)
MEASURE_CONFIGS = {
    "smoke": PretrainConfig(n_layer=2, n_head=2, d_model=32, block_size=32, batch_size=8, compile=False),
    "cpu": PretrainConfig(compile=True),
    "gpu": PretrainConfig(compile=True),
}
MEASURE_STEPS = {"smoke": 5, "cpu": 40, "gpu": 40}  # optimisation steps per timed call


def reference_loop(
    cfg: PretrainConfig, data: torch.Tensor, vocab: int, device: str = "cpu"
) -> Callable[[int], list[float]]:
    """A straightforward nanoGPT-style loop: eager float32 model, default AdamW, no compilation. Returns
    ``steps(n)``, which runs the next ``n`` steps (same seed and batch sampling as ``train_gpt``; learning rate
    fixed at ``cfg.lr``) and returns their losses."""
    torch.manual_seed(cfg.seed)
    model = GPT(gpt_config(cfg, vocab)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)

    def steps(n: int) -> list[float]:
        losses = []
        for _ in range(n):
            ix = torch.randint(len(data) - cfg.block_size - 1, (cfg.batch_size,), generator=gen)
            x = torch.stack([data[i : i + cfg.block_size] for i in ix.tolist()]).to(device)
            y = torch.stack([data[i + 1 : i + 1 + cfg.block_size] for i in ix.tolist()]).to(device)
            _, loss, _ = model(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            losses.append(loss.item())
        return losses

    return steps


def lab_loop(cfg: PretrainConfig, data: torch.Tensor, vocab: int, device: str = "cpu") -> Callable[[int], list[float]]:
    """The lab's training step as ``train_gpt`` runs it (:func:`lab.train.pretraining.new_training`), as
    ``steps(n)`` like :func:`reference_loop` (same seed, same batches, learning rate fixed at ``cfg.lr``)."""
    step = new_training(cfg, vocab, device)
    gen = torch.Generator().manual_seed(cfg.seed)

    def steps(n: int) -> list[float]:
        return [step(*get_batch(data, cfg.block_size, cfg.batch_size, gen), cfg.lr)[0] for _ in range(n)]

    return steps


def path_name(cfg: PretrainConfig) -> str:
    """The training path of ``cfg`` in words: "bf16 autocast, torch.compile", "fp32 eager", ..."""
    fmt = "bf16 autocast" if cfg.precision == "bf16" else "fp32"
    return f"{fmt}, {'torch.compile' if cfg.compile else 'eager'}"


def run(cfg: PretrainConfig, corpus: Corpus, *, steps: int = 200, warmup: int = 20) -> pl.DataFrame:
    """Training tokens/s of the reference loop, of lab's loop on the float32 eager path and of lab's loop as ``cfg``
    trains (when that path is another one), on the same model and corpus: ``warmup`` untimed steps each (compiling
    included), then ``steps`` timed steps each, alternated between the loops in chunks (tokens/s of the median
    chunk), so that all of them see the same machine. Prints one ratio line per loop; writes nothing.

    Returns:
        One row per loop: tokens/s, ms/step, ratio to the reference loop, warm-up seconds, torch threads.
    """
    check_counts(steps=steps, warmup=warmup)
    tok = CharTokenizer.from_text(corpus.train_text + corpus.val_text)
    data = tok.encode(corpus.train_text)
    plain = replace(cfg, precision="fp32", compile=False)
    loops = {
        "reference (eager, nanoGPT-style loop)": reference_loop(cfg, data, tok.vocab_size),
        "lab loop, fp32 eager": lab_loop(plain, data, tok.vocab_size),
    }
    if cfg != plain:
        loops[f"lab loop, {path_name(cfg)} (what the profile trains with)"] = lab_loop(cfg, data, tok.vocab_size)
    warm = {}
    for name, fn in loops.items():
        t0 = time.perf_counter()
        fn(warmup)
        warm[name] = time.perf_counter() - t0
    chunk = max(1, steps // 10)
    times = alternate({name: partial(fn, chunk) for name, fn in loops.items()}, repeats=steps // chunk, warmup=0)
    tok_per_step = cfg.batch_size * cfg.block_size
    tps = {name: chunk * tok_per_step / statistics.median(t) for name, t in times.items()}
    ref = tps["reference (eager, nanoGPT-style loop)"]
    frame = pl.DataFrame(
        {
            "loop": list(loops),
            "tokens_per_s": [tps[n] for n in loops],
            "ms_per_step": [1000 * tok_per_step / tps[n] for n in loops],
            "ratio": [tps[n] / ref for n in loops],
            "warmup_s": [None if n.startswith("reference") else warm[n] for n in loops],
            "threads": [torch.get_num_threads()] * len(loops),
        }
    )
    for loop, t, ratio in frame.select("loop", "tokens_per_s", "ratio").iter_rows():
        print(f"pretrain throughput: {loop:<60} {t:>9,.0f} tok/s  ratio {ratio:.2f}x")
    print(
        f"({warmup} warm-up steps, then {steps // chunk * chunk} steps in chunks of {chunk}, alternated, same run, "
        f"{torch.get_num_threads()} threads)"
    )
    return frame


def flops_per_token(cfg: PretrainConfig, vocab: int) -> float:
    """Training FLOPs per token, nanoGPT's ``estimate_mfu``: 6N + 12 L H Q T (N without position embeddings)."""
    n = GPT(gpt_config(cfg, vocab)).n_params()
    return 6 * n + 12 * cfg.n_layer * cfg.n_head * (cfg.d_model // cfg.n_head) * cfg.block_size


def measure(profile: Profile, *, repeats: int = 5) -> Measurement:
    """The speed suite's ``pretrain`` row: :func:`reference_loop` (baseline) and :func:`lab_loop` on the profile's
    recipe (:data:`MEASURE_CONFIGS`), ``MEASURE_STEPS`` steps per call, alternated ``repeats`` times after one
    untimed round (which compiles). Both train the same model from the same seed on the same batches; the note
    gives both losses after the last call."""
    device = profile.require_device()
    cfg = MEASURE_CONFIGS.get(profile.name, MEASURE_CONFIGS["cpu"])
    n = MEASURE_STEPS.get(profile.name, MEASURE_STEPS["cpu"])
    corpus = load_corpus(profile)
    tok = CharTokenizer.from_text(corpus.train_text + corpus.val_text)
    data = tok.encode(corpus.train_text)
    ref = reference_loop(cfg, data, tok.vocab_size, device)
    lab = lab_loop(cfg, data, tok.vocab_size, device)
    last: dict[str, list[float]] = {}

    def call(name: str, fn: Callable[[int], list[float]]) -> Callable[[], None]:
        return lambda: last.__setitem__(name, fn(n))

    times = alternate({"baseline": call("baseline", ref), "fast": call("fast", lab)}, repeats=repeats)
    trained = n * (repeats + 1)
    return Measurement(
        workload="pretrain",
        baseline="nanoGPT-style reference loop: fp32 eager, default AdamW",
        fast=f"lab's training step: {path_name(cfg)}, fused AdamW",
        tokens_per_call=n * cfg.batch_size * cfg.block_size,
        baseline_s=times["baseline"],
        fast_s=times["fast"],
        flops_per_token=flops_per_token(cfg, tok.vocab_size),
        fast_dtype="bf16" if cfg.precision == "bf16" else "fp32",
        target=1.3,
        note=(
            f"{cfg.n_layer}L d{cfg.d_model} B{cfg.batch_size} T{cfg.block_size}, {n} steps a call; mean loss of the "
            f"last call after {trained} steps: reference {sum(last['baseline']) / n:.4f}, lab "
            f"{sum(last['fast']) / n:.4f}"
        ),
    )
