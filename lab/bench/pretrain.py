"""Benchmark (not a test): training throughput of lab's pretraining loop against a plain nanoGPT-style loop on the
same model, measured in the same run. ``lab bench pretrain`` runs it through the track that records it.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace

import polars as pl
import torch

from lab.bench import check_counts
from lab.data.corpus import Corpus
from lab.models.gpt import GPT
from lab.models.tokenizer import CharTokenizer
from lab.train.pretraining import PretrainConfig, gpt_config, train_gpt


def reference_loop_tokens_per_s(cfg: PretrainConfig, data: torch.Tensor, vocab: int, steps: int, warmup: int) -> float:
    """A straightforward nanoGPT-style loop: eager model, default AdamW, no compilation."""
    torch.manual_seed(cfg.seed)
    model = GPT(gpt_config(cfg, vocab))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    elapsed = 0.0
    for it in range(warmup + steps):
        t0 = time.perf_counter()
        ix = torch.randint(len(data) - cfg.block_size - 1, (cfg.batch_size,), generator=gen)
        x = torch.stack([data[i : i + cfg.block_size] for i in ix.tolist()])
        y = torch.stack([data[i + 1 : i + 1 + cfg.block_size] for i in ix.tolist()])
        _, loss, _ = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        loss.item()
        if it >= warmup:
            elapsed += time.perf_counter() - t0
    return steps * cfg.batch_size * cfg.block_size / elapsed


def lab_loop_tokens_per_s(
    cfg: PretrainConfig, corpus: Corpus, steps: int, warmup: int, compile: bool
) -> tuple[float, float]:
    """``lab.train.pretraining.train_gpt`` (fused AdamW, one-gather batches, cached RoPE tables), optionally compiled;
    returns (tokens/s after warmup, warmup seconds)."""
    bench_cfg = replace(
        cfg,
        max_iters=warmup + steps,
        eval_interval=10**9,
        eval_iters=1,
        final_eval_iters=1,
        checkpoint_interval=10**9,
        sample_chars=1,
        compile=compile,
    )
    with tempfile.TemporaryDirectory() as tmp:
        res = train_gpt(bench_cfg, corpus, tmp, resume=False, progress=False)
    steps_df, _, _ = res.log.frames()
    tokens = bench_cfg.batch_size * bench_cfg.block_size
    timed = steps_df.filter(pl.col("step") >= warmup)
    warm = steps_df.filter(pl.col("step") < warmup)
    return (
        timed.height * tokens / (tokens / timed["tokens_per_s"]).sum(),
        float((tokens / warm["tokens_per_s"]).sum()),
    )


def run(cfg: PretrainConfig, corpus: Corpus, *, steps: int = 200, warmup: int = 20) -> pl.DataFrame:
    """Training tokens/s of lab's loop (eager, and compiled when ``cfg.compile``) vs the reference loop on the same
    model and corpus, timed over ``steps`` steps after ``warmup`` untimed ones. Prints one ratio line per loop;
    writes nothing.

    Returns:
        One row per loop: tokens/s, ms/step, ratio to the reference loop, warm-up seconds, torch threads.
    """
    check_counts(steps=steps, warmup=warmup)
    tok = CharTokenizer.from_text(corpus.train_text + corpus.val_text)
    data = tok.encode(corpus.train_text)
    ref = reference_loop_tokens_per_s(cfg, data, tok.vocab_size, steps, warmup)
    rows = [("reference (eager, nanoGPT-style loop)", ref, None)]
    eager, eager_warm = lab_loop_tokens_per_s(cfg, corpus, steps, warmup, compile=False)
    rows.append(("lab loop, eager", eager, eager_warm))
    if cfg.compile:
        comp, comp_warm = lab_loop_tokens_per_s(cfg, corpus, steps, warmup, compile=True)
        rows.append(("lab loop, torch.compile (what the profile trains with)", comp, comp_warm))
    tok_per_step = cfg.batch_size * cfg.block_size
    frame = pl.DataFrame(
        {
            "loop": [r[0] for r in rows],
            "tokens_per_s": [r[1] for r in rows],
            "ms_per_step": [1000 * tok_per_step / r[1] for r in rows],
            "ratio": [r[1] / ref for r in rows],
            "warmup_s": [r[2] for r in rows],
            "threads": [torch.get_num_threads()] * len(rows),
        }
    )
    for loop, tps, ratio in frame.select("loop", "tokens_per_s", "ratio").iter_rows():
        print(f"pretrain throughput: {loop:<55} {tps:>9,.0f} tok/s  ratio {ratio:.2f}x")
    print(f"(timed {steps} steps after {warmup} warm-up steps, same run, {torch.get_num_threads()} threads)")
    return frame
