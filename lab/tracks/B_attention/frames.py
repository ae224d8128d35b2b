"""Track B's frames: per-head scores, example patterns, capture memory, and base vs fine-tuned, each a polars frame
built from a model through :mod:`lab.interp.attention` (every aggregation the charts and the summary use is here)."""

from __future__ import annotations

import gc
import math
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import torch

from lab.data.prompts import PATTERN_PROMPT, PROMPTS, TASK_PROMPTS, bos_ids, encode
from lab.data.records import chat_text
from lab.errors import LabError
from lab.interp import attention as att
from lab.interp.capture import capture, estimate, max_tokens_within, model_shape
from lab.interp.names import PATTERN_KIND, hook_names
from lab.models.loading import LoadedModel
from lab.tracks.B_attention.config import AttentionConfig

MiB = 2**20
GiB = 2**30

# ----------------------------------------------------------------------------- one prompt (the notebook's view)


def prompt_patterns(lm: LoadedModel, text: str) -> tuple[torch.Tensor, list[str]]:
    """Every layer's patterns ``(L, H, T, T)`` on ``text`` and its token labels; a too-short text raises LabError."""
    ids = encode(lm, text)
    return att.patterns_for(lm.model, ids), att.token_labels(lm.tokenizer, ids[0].tolist())


def prompt_heads(patterns: torch.Tensor) -> pl.DataFrame:
    """Entropy, normalised entropy, sink share and previous-token score per (layer, head) of one prompt."""
    return att.head_frame(att.head_scores(patterns))


def one_head(patterns: torch.Tensor, labels: list[str], layer: int, head: int) -> pl.DataFrame:
    """One head's pattern as a long frame, labelled for :func:`lab.tracks.B_attention.charts.patterns`."""
    return att.pattern_frame(patterns, labels, [(layer, head)], head_label=f"layer {layer}, head {head}")


# ----------------------------------------------------------------------------- head scores


def head_table(
    lm: LoadedModel, cfg: AttentionConfig, prompts: tuple[str, ...] = PROMPTS, progress: bool = False
) -> pl.DataFrame:
    """Per (layer, head): entropy, normalised entropy, sink share and previous-token score averaged over
    ``prompts``, and the induction score averaged over repeated random token sequences."""
    model = lm.model
    sums: dict[str, torch.Tensor] = {}
    items = list(prompts)
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="prompts", leave=False)
    for text in items:
        for k, v in att.head_scores(att.patterns_for(model, encode(lm, text))).items():
            sums[k] = sums.get(k, 0) + v / len(prompts)
    gen = torch.Generator().manual_seed(cfg.seed)
    vocab = plain_vocab(lm)
    prefix = bos_ids(lm)
    ind = 0
    for _ in range(cfg.induction_seqs):
        ids = att.repeated_random_tokens(cfg.induction_len, vocab, generator=gen, prefix=prefix)
        ind = (
            ind
            + att.induction_scores(att.patterns_for(model, ids), cfg.induction_len, len(prefix)) / cfg.induction_seqs
        )
    sums["induction"] = ind
    return att.head_frame(sums)


def plain_vocab(lm: LoadedModel) -> list[int]:
    """Token ids that are not special tokens (random sequences draw from these)."""
    special = set(getattr(lm.tokenizer, "all_special_ids", []) or [])
    n = lm.model.get_input_embeddings().num_embeddings
    return [i for i in range(min(n, len(lm.tokenizer))) if i not in special]


def notable_heads(heads: pl.DataFrame) -> list[tuple[int, int, str]]:
    """(layer, head, label) of the strongest sink, previous-token and induction heads and the broadest head."""
    picks = []
    for metric, title in (
        ("prev_token", "previous-token"),
        ("induction", "induction"),
        ("sink_share", "first-token sink"),
        ("entropy_norm", "broadest"),
    ):
        row = heads.sort(metric, descending=True).row(0, named=True)
        picks.append(
            (row["layer"], row["head"], f"L{row['layer']} H{row['head']} · {title} ({metric} {row[metric]:.2f})")
        )
    return picks


def pattern_examples(lm: LoadedModel, heads: pl.DataFrame, text: str = PATTERN_PROMPT) -> pl.DataFrame:
    """Long frame of the notable heads' patterns on ``text``, one ``head_label`` per head."""
    ids = encode(lm, text)
    pats = att.patterns_for(lm.model, ids)
    labels = att.token_labels(lm.tokenizer, ids[0].tolist())
    frames = []
    for i, (layer, head, label) in enumerate(notable_heads(heads)):
        frames.append(att.pattern_frame(pats, labels, [(layer, head)], head_label=f"{i + 1}. {label}"))
    return pl.concat(frames)


def top_heads(heads: pl.DataFrame, k: int = 4) -> pl.DataFrame:
    """The ``k`` strongest heads by previous-token score, induction score and first-token share (one table)."""
    frames = []
    for metric, title in (
        ("prev_token", "previous-token"),
        ("induction", "induction"),
        ("sink_share", "first-token sink"),
    ):
        frames.append(heads.sort(metric, descending=True).head(k).with_columns(pl.lit(title).alias("ranked_by")))
    return pl.concat(frames).select(
        "ranked_by", "layer", "head", "prev_token", "induction", "sink_share", "entropy_norm"
    )


def first_layer_over(heads: pl.DataFrame, metric: str, threshold: float) -> int:
    """First layer with a head whose ``metric`` exceeds ``threshold`` (-1 if none)."""
    hit = heads.filter(pl.col(metric) > threshold)
    return int(hit["layer"].min()) if hit.height else -1


def layers_over(heads: pl.DataFrame, metric: str, threshold: float) -> str:
    """Comma-separated layers that hold a head with ``metric > threshold`` ("none" if none)."""
    layers = sorted(set(heads.filter(pl.col(metric) > threshold)["layer"].to_list()))
    return ", ".join(map(str, layers)) or "none"


# ----------------------------------------------------------------------------- memory


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def peak_rss_delta(fn: Callable[[], Any]) -> tuple[Any, int, float]:
    """Run ``fn()``; return (its result, peak resident memory above the starting point in bytes, seconds).
    Samples /proc/self/statm every millisecond from a thread (Linux)."""
    gc.collect()
    start = _rss()
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    try:
        out = fn()
    finally:
        secs = time.perf_counter() - t0
        done.set()
        t.join()
    peak[0] = max(peak[0], _rss())
    return out, peak[0] - start, secs


def memory_table(lm: LoadedModel, cfg: AttentionConfig) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Estimated vs measured memory of capturing every layer's patterns at several lengths, a streamed capture
    past the budget, and the guard's answer on a long input. Returns (memory rows, guard row)."""
    model = lm.model
    shape = model_shape(model)
    n_layers = int(shape["n_layers"])
    names = hook_names(n_layers, [PATTERN_KIND])
    base = encode(lm, " ".join(PROMPTS))[0]

    def ids_of(T: int) -> torch.Tensor:  # real text, repeated to length T
        reps = math.ceil(T / len(base))
        return base.repeat(reps)[:T].unsqueeze(0)

    rows = []
    for T in cfg.memory_tokens:
        ids = ids_of(T)
        est = estimate(model, ids, names, logits=False)
        cap, peak, secs = peak_rss_delta(
            lambda ids=ids: capture(model, ids, names, logits=False, max_bytes=cfg.max_bytes)
        )
        held = sum(t.numel() * t.element_size() for t in cap.tensors.values())
        rows.append(
            {
                "mode": "in memory",
                "tokens": T,
                "estimate_mib": est.held(False) / MiB,
                "captured_mib": held / MiB,
                "disk_mib": 0.0,
                "peak_rss_delta_mib": peak / MiB,
                "seconds": secs,
            }
        )
        del cap
        gc.collect()
    T = cfg.stream_tokens
    ids = ids_of(T)
    est = estimate(model, ids, names, logits=False)
    with tempfile.TemporaryDirectory(prefix="lab-stream-") as tmp:
        cap, peak, secs = peak_rss_delta(
            lambda: capture(model, ids, names, logits=False, max_bytes=cfg.max_bytes, stream_to=tmp)
        )
        disk = sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors"))
        # Read one layer back to check the file holds a pattern (rows sum to one).
        back = cap[names[-1]]
        ok = bool(torch.allclose(back.sum(-1), torch.ones(()), atol=1e-4))
    rows.append(
        {
            "mode": "streamed to disk",
            "tokens": T,
            "estimate_mib": est.held(True) / MiB,
            "captured_mib": 0.0,
            "disk_mib": disk / MiB,
            "peak_rss_delta_mib": peak / MiB,
            "seconds": secs,
        }
    )
    # The guard on a long input: refuses in memory (before any forward pass), and says what would fit.
    long_ids = ids_of(cfg.guard_tokens)
    est = estimate(model, long_ids, names, logits=True)
    t0 = time.perf_counter()
    try:
        capture(model, long_ids, names, max_bytes=cfg.max_bytes)
        refused, message = False, ""
    except LabError as e:
        refused, message = True, str(e)
    guard = pl.DataFrame(
        [
            {
                "tokens": cfg.guard_tokens,
                "layers": n_layers,
                "heads": int(shape["n_heads"]),
                "pattern_estimate_gib": est.patterns / GiB,
                "logits_estimate_gib": est.logits / GiB,
                "budget_gib": cfg.max_bytes / GiB,
                "refused": refused,
                "seconds_to_refuse": time.perf_counter() - t0,
                "stream_held_mib": est.held(True) / MiB,
                "message": message,
                "max_tokens_in_budget": max_tokens_within(cfg.max_bytes, 1, n_layers, int(shape["n_heads"])),
                "stream_readback_rows_sum_to_one": ok,
            }
        ]
    )
    return pl.DataFrame(rows), guard


# ----------------------------------------------------------------------------- base vs fine-tuned


def task_prompt_ids(lm: LoadedModel, prompts: tuple[str, ...] = TASK_PROMPTS) -> list[torch.Tensor]:
    """The fine-tuning task's prompts as Track A feeds them to the model (its chat format, no extra BOS)."""
    return [
        lm.tokenizer(chat_text(lm.tokenizer, t), add_special_tokens=False, return_tensors="pt").input_ids
        for t in prompts
    ]


def compare_finetuned(
    base: LoadedModel, tuned: LoadedModel, inputs: list[torch.Tensor]
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Per head: JS divergence and entropy change averaged over ``inputs`` (``(1, T)`` ids each); and
    side-by-side patterns, on the first input, of the head that moved most. Returns (per-head frame, patterns)."""
    acc: dict[str, torch.Tensor] = {}
    for ids in inputs:
        for k, v in att.compare_patterns(att.patterns_for(base.model, ids), att.patterns_for(tuned.model, ids)).items():
            acc[k] = acc.get(k, 0) + v / len(inputs)
    heads = (
        att.head_frame(acc).sort("js_bits", descending=True).with_columns(pl.int_range(1, pl.len() + 1).alias("rank"))
    )
    top = heads.row(0, named=True)
    ids = inputs[0]
    labels = att.token_labels(base.tokenizer, ids[0].tolist())
    lh = [(top["layer"], top["head"])]
    tag = f"L{top['layer']} H{top['head']}"
    pats = pl.concat(
        [
            att.pattern_frame(att.patterns_for(base.model, ids), labels, lh, head_label=f"base · {tag}"),
            att.pattern_frame(att.patterns_for(tuned.model, ids), labels, lh, head_label=f"fine-tuned · {tag}"),
        ]
    )
    return heads.sort("layer", "head"), pats


def finetune_top(task_heads: pl.DataFrame, k: int = 10) -> pl.DataFrame:
    """The ``k`` heads that moved most on the task prompts."""
    return task_heads.sort("js_bits", descending=True).head(k)


def shift_summary(heads: pl.DataFrame, prefix: str) -> dict[str, Any]:
    """Headline numbers of a per-head comparison frame, keys prefixed (``general_``, ``task_``)."""
    top = heads.sort("js_bits", descending=True)
    total = max(float(heads["js_bits"].sum()), 1e-30)
    by_layer = heads.group_by("layer").agg(pl.col("js_bits").sum()).sort("js_bits", descending=True)
    k = max(1, heads.height // 20)
    return {
        f"{prefix}{key}": v
        for key, v in {
            "max_js_bits": top["js_bits"][0],
            "max_js_layer": top["layer"][0],
            "max_js_head": top["head"][0],
            "mean_js_bits": heads["js_bits"].mean(),
            "median_js_bits": heads["js_bits"].median(),
            "top5pct_heads": k,
            "top5pct_js_share": float(top["js_bits"].head(k).sum()) / total,
            "top_layer_by_js": by_layer["layer"][0],
            "top_layer_js_share": float(by_layer["js_bits"][0]) / total,
            "mean_entropy_change": heads["entropy_change"].mean(),
            "max_abs_entropy_change": float(heads["entropy_change"].abs().max()),
        }.items()
    }


def finetune_summary(
    general: pl.DataFrame, task: pl.DataFrame, *, source: str, adapter: str, seconds: float
) -> pl.DataFrame:
    """One row: where the adapter came from, the shift on the general and on the task prompts, and their ratio."""
    return pl.DataFrame(
        [
            {
                "adapter_source": source,
                "adapter_dir": adapter,
                **shift_summary(general, "general_"),
                **shift_summary(task, "task_"),
                "task_over_general_mean_js": float(task["js_bits"].mean() / max(general["js_bits"].mean(), 1e-30)),
                "seconds": seconds,
            }
        ]
    )
