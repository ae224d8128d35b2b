"""Benchmarks (not tests): ratios against a baseline measured in the same run, printed and written to results.

    python -m lab.bench pretrain [--profile cpu] [--steps 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace

import polars as pl
import torch

from lab.data.corpus import load_corpus
from lab.models.gpt import GPT
from lab.train.pretraining import gpt_config, train_gpt
from lab.profiles import Profile, get_profile
from lab.results import write_result
from lab.models.tokenizer import CharTokenizer


def reference_loop_tokens_per_s(cfg, data: torch.Tensor, vocab: int, steps: int, warmup: int) -> float:
    """A straightforward nanoGPT-style loop: eager model, default AdamW, no compilation."""
    torch.manual_seed(cfg.seed)
    model = GPT(gpt_config(cfg, vocab))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    elapsed = 0.0
    for it in range(warmup + steps):
        t0 = time.perf_counter()
        ix = torch.randint(len(data) - cfg.block_size - 1, (cfg.batch_size,), generator=gen)
        x = torch.stack([data[i:i + cfg.block_size] for i in ix.tolist()])
        y = torch.stack([data[i + 1:i + 1 + cfg.block_size] for i in ix.tolist()])
        _, loss, _ = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        loss.item()
        if it >= warmup:
            elapsed += time.perf_counter() - t0
    return steps * cfg.batch_size * cfg.block_size / elapsed


def lab_loop_tokens_per_s(cfg, corpus, steps: int, warmup: int, compile: bool) -> tuple[float, float]:
    """``lab.train.pretraining.train_gpt`` (fused AdamW, one-gather batches, cached RoPE tables), optionally compiled;
    returns (tokens/s after warmup, warmup seconds)."""
    bench_cfg = replace(cfg, max_iters=warmup + steps, eval_interval=10**9, eval_iters=1, final_eval_iters=1,
                        checkpoint_interval=10**9, sample_chars=1, compile=compile)
    with tempfile.TemporaryDirectory() as tmp:
        res = train_gpt(bench_cfg, corpus, tmp, resume=False, progress=False)
    steps_df, _, _ = res.log.frames()
    tokens = bench_cfg.batch_size * bench_cfg.block_size
    timed = steps_df.filter(pl.col("step") >= warmup)
    warm = steps_df.filter(pl.col("step") < warmup)
    return (timed.height * tokens / (tokens / timed["tokens_per_s"]).sum(),
            float((tokens / warm["tokens_per_s"]).sum()))


def pretrain_throughput(profile: str | Profile | None = None, steps: int = 200, warmup: int = 20,
                        write: bool = False) -> pl.DataFrame:
    """Training tokens/s of lab's loop vs the reference loop on the same model, same run. Prints the ratio."""
    p = get_profile(profile)
    if p.name == "smoke":
        steps, warmup = min(steps, 20), min(warmup, 3)
    corpus = load_corpus(p)
    tok = CharTokenizer.from_text(corpus.train_text + corpus.val_text)
    data = tok.encode(corpus.train_text)
    t0 = time.perf_counter()
    ref = reference_loop_tokens_per_s(p.pretrain, data, tok.vocab_size, steps, warmup)
    rows = [("reference (eager, nanoGPT-style loop)", ref, None)]
    eager, eager_warm = lab_loop_tokens_per_s(p.pretrain, corpus, steps, warmup, compile=False)
    rows.append(("lab loop, eager", eager, eager_warm))
    if p.pretrain.compile:
        comp, comp_warm = lab_loop_tokens_per_s(p.pretrain, corpus, steps, warmup, compile=True)
        rows.append(("lab loop, torch.compile (what the profile trains with)", comp, comp_warm))
    tok_per_step = p.pretrain.batch_size * p.pretrain.block_size
    frame = pl.DataFrame({
        "loop": [r[0] for r in rows],
        "tokens_per_s": [r[1] for r in rows],
        "ms_per_step": [1000 * tok_per_step / r[1] for r in rows],
        "ratio": [r[1] / ref for r in rows],
        "warmup_s": [r[2] for r in rows],
        "threads": [torch.get_num_threads()] * len(rows),
    })
    for loop, tps, ratio in frame.select("loop", "tokens_per_s", "ratio").iter_rows():
        print(f"pretrain throughput: {loop:<55} {tps:>9,.0f} tok/s  ratio {ratio:.2f}x")
    print(f"(timed {steps} steps after {warmup} warm-up steps, same run, {torch.get_num_threads()} threads)")
    if write:
        write_result("pretrain", "benchmark", frame, config={"steps": steps, "warmup": warmup},
                     seed=p.pretrain.seed, profile=p.name, wall_time_s=time.perf_counter() - t0)
    return frame


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lab.bench", description=__doc__)
    ap.add_argument("which", choices=["pretrain"])
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--write", action="store_true", help="also write results/<track>/benchmark.parquet")
    a = ap.parse_args(argv)
    pretrain_throughput(a.profile, steps=a.steps, write=a.write)


if __name__ == "__main__":
    main()
