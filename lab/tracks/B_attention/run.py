"""Attention track: where heads look (entropy, first-token sinks, previous-token and induction heads), what
capturing attention costs in memory, and how a LoRA fine-tune changes the patterns. Writes results/B_attention/."""

from __future__ import annotations

import gc
import math
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import polars as pl
import torch

from lab.interp import attention as att
from lab.interp.capture import DEFAULT_MAX_BYTES, capture, estimate, model_shape
from lab.interp.names import PATTERN_KIND, hook_names
from lab.errors import LabError
from lab import paths
from lab.models.loading import LoadedModel, load_model
from lab.profiles import Profile, get_profile
from lab.data.prompts import PATTERN_PROMPT, PROMPTS, TASK_PROMPTS, bos_ids, encode
from lab.results import Stopwatch, write_result

TRACK = "B_attention"

@dataclass(frozen=True)
class AttentionConfig:
    """What the track measures; defaults are the ``cpu`` profile's (SmolLM2-135M, 2-core CPU)."""

    induction_len: int = 25  # |R| in BOS + R + R
    induction_seqs: int = 8
    memory_tokens: tuple[int, ...] = (64, 128, 256, 512)  # in-memory pattern captures of every layer, measured
    stream_tokens: int = 1024  # a capture past the budget, streamed to disk layer by layer
    guard_tokens: int = 4096  # a long input the guard must refuse in memory
    max_bytes: int = DEFAULT_MAX_BYTES
    seed: int = 0


SMOKE = AttentionConfig(induction_len=8, induction_seqs=2, memory_tokens=(16, 32, 64), stream_tokens=128,
                        guard_tokens=256, max_bytes=1 << 20)


def config_for(profile: Profile) -> AttentionConfig:
    return SMOKE if profile.name == "smoke" else AttentionConfig()


# ----------------------------------------------------------------------------- head scores


def head_table(lm: LoadedModel, cfg: AttentionConfig, prompts: tuple[str, ...] = PROMPTS,
               progress: bool = False) -> pl.DataFrame:
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
    vocab = _plain_vocab(lm)
    prefix = bos_ids(lm)
    ind = 0
    for _ in range(cfg.induction_seqs):
        ids = att.repeated_random_tokens(cfg.induction_len, vocab, generator=gen, prefix=prefix)
        ind = ind + att.induction_scores(att.patterns_for(model, ids), cfg.induction_len, len(prefix)) / cfg.induction_seqs
    sums["induction"] = ind
    return att.head_frame(sums)


def _plain_vocab(lm: LoadedModel) -> list[int]:
    """Token ids that are not special tokens (random sequences draw from these)."""
    special = set(getattr(lm.tokenizer, "all_special_ids", []) or [])
    n = lm.model.get_input_embeddings().num_embeddings
    return [i for i in range(min(n, len(lm.tokenizer))) if i not in special]


def notable_heads(heads: pl.DataFrame) -> list[tuple[int, int, str]]:
    """(layer, head, label) of the strongest sink, previous-token and induction heads and the broadest head."""
    picks = []
    for metric, title in (("prev_token", "previous-token"), ("induction", "induction"), ("sink_share", "first-token sink"),
                          ("entropy_norm", "broadest")):
        row = heads.sort(metric, descending=True).row(0, named=True)
        picks.append((row["layer"], row["head"], f"L{row['layer']} H{row['head']} · {title} ({metric} {row[metric]:.2f})"))
    return picks


def pattern_examples(lm: LoadedModel, heads: pl.DataFrame, text: str = PATTERN_PROMPT) -> pl.DataFrame:
    """Long frame of the notable heads' patterns on ``text``, labelled for :func:`lab.interp.attention.plot_patterns`."""
    ids = encode(lm, text)
    pats = att.patterns_for(lm.model, ids)
    labels = att.token_labels(lm.tokenizer, ids[0].tolist())
    frames = []
    for i, (layer, head, label) in enumerate(notable_heads(heads)):
        frames.append(att.pattern_frame(pats, labels, [(layer, head)], head_label=f"{i + 1}. {label}"))
    return pl.concat(frames)


# ----------------------------------------------------------------------------- memory


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def peak_rss_delta(fn: Any) -> tuple[Any, int, float]:
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

    MiB = 2 ** 20
    rows = []
    for T in cfg.memory_tokens:
        ids = ids_of(T)
        est = estimate(model, ids, names, logits=False)
        cap, peak, secs = peak_rss_delta(lambda ids=ids: capture(model, ids, names, logits=False, max_bytes=cfg.max_bytes))
        held = sum(t.numel() * t.element_size() for t in cap.tensors.values())
        rows.append({"mode": "in memory", "tokens": T, "estimate_mib": est.held(False) / MiB, "captured_mib": held / MiB,
                     "disk_mib": 0.0, "peak_rss_delta_mib": peak / MiB, "seconds": secs})
        del cap
        gc.collect()
    T = cfg.stream_tokens
    ids = ids_of(T)
    est = estimate(model, ids, names, logits=False)
    with tempfile.TemporaryDirectory(prefix="lab-stream-") as tmp:
        cap, peak, secs = peak_rss_delta(
            lambda: capture(model, ids, names, logits=False, max_bytes=cfg.max_bytes, stream_to=tmp))
        disk = sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors"))
        # Read one layer back to check the file holds a pattern (rows sum to one).
        back = cap[names[-1]]
        ok = bool(torch.allclose(back.sum(-1), torch.ones(()), atol=1e-4))
    rows.append({"mode": "streamed to disk", "tokens": T, "estimate_mib": est.held(True) / MiB,
                 "captured_mib": 0.0, "disk_mib": disk / MiB, "peak_rss_delta_mib": peak / MiB, "seconds": secs})
    # The guard on a long input: refuses in memory (before any forward pass), and says what would fit.
    long_ids = ids_of(cfg.guard_tokens)
    est = estimate(model, long_ids, names, logits=True)
    t0 = time.perf_counter()
    try:
        capture(model, long_ids, names, max_bytes=cfg.max_bytes)
        refused, message = False, ""
    except LabError as e:
        refused, message = True, str(e)
    guard = pl.DataFrame([{
        "tokens": cfg.guard_tokens, "layers": n_layers, "heads": int(shape["n_heads"]),
        "pattern_estimate_gib": est.patterns / 2 ** 30, "logits_estimate_gib": est.logits / 2 ** 30,
        "budget_gib": cfg.max_bytes / 2 ** 30, "refused": refused, "seconds_to_refuse": time.perf_counter() - t0,
        "stream_held_mib": est.held(True) / MiB, "message": message,
        "max_tokens_in_budget": int((cfg.max_bytes / (n_layers * int(shape["n_heads"]) * 4)) ** 0.5),
        "stream_readback_rows_sum_to_one": ok,
    }])
    return pl.DataFrame(rows), guard


# ----------------------------------------------------------------------------- base vs fine-tuned


def _shown_path(path: Path) -> str:
    """A path as results should record it: relative to the data folder's parent (no machine-specific prefix)."""
    path = Path(path).resolve()
    try:
        return path.relative_to(paths.data_dir().resolve().parent).as_posix()
    except ValueError:
        return path.name


def adapter_dir(profile: Profile) -> Path:
    """Track A's final LoRA adapter for ``profile`` (``lab.tracks.A_finetuning.config.final_adapter_dir``)."""
    return paths.adapter_dir(profile.name, "A_finetuning", "main")


def smoke_adapter(profile: Profile, steps: int = 30, seed: int = 0) -> Path:
    """A tiny LoRA adapter trained here in a few steps on the smoke corpus (stands in for Track A's on smoke)."""
    from peft import LoraConfig, get_peft_model

    from lab.data.corpus import smoke_text

    folder = paths.adapter_dir(profile.name, TRACK, "smoke-lora")
    if (folder / "adapter_config.json").exists():
        return folder
    lm = load_model(profile)
    torch.manual_seed(seed)
    model = get_peft_model(lm.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"],
                                                lora_dropout=0.0))
    ids = lm.tokenizer(smoke_text()[:4000], return_tensors="pt").input_ids[0]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    block = 32
    for step in range(steps):
        i = (step * 17) % max(1, len(ids) - block - 1)
        x = ids[i:i + block].unsqueeze(0)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    folder.parent.mkdir(parents=True, exist_ok=True)
    if not folder.exists():
        tmp.rename(folder)
    return folder


def resolve_adapter(profile: Profile) -> tuple[Path, str]:
    """(adapter folder, where it came from). On smoke without Track A's adapter, trains a tiny one; on other
    profiles a missing adapter raises :class:`LabError` naming the command that makes it."""
    folder = adapter_dir(profile)
    if (folder / "adapter_config.json").exists():
        return folder, "Track A (the fine-tuning track, main run)"
    if profile.name == "smoke":
        return smoke_adapter(profile), "smoke LoRA trained by the attention track"
    raise LabError(f"no fine-tuned adapter at {folder}: run `lab run A_finetuning --profile {profile.name}` first "
                   "(the base-vs-fine-tuned comparison needs Track A's adapter)")


def load_tuned(profile: Profile, folder: Path) -> LoadedModel:
    """The profile's base model with the LoRA adapter in ``folder`` applied (a separate copy of the weights)."""
    from peft import PeftModel

    lm = load_model(profile)
    tuned = PeftModel.from_pretrained(lm.model, str(folder))
    tuned.eval()
    return LoadedModel(model=tuned, tokenizer=lm.tokenizer, name=f"{lm.name}+LoRA", arch=lm.arch)


def task_prompt_ids(lm: LoadedModel, prompts: tuple[str, ...] = TASK_PROMPTS) -> list[torch.Tensor]:
    """The fine-tuning task's prompts as Track A feeds them to the model (its chat format, no extra BOS)."""
    try:
        from lab.data.records import chat_text
    except ImportError:  # Track A not installed: plain text
        def chat_text(tokenizer: Any, prompt: str) -> str:
            return prompt
    return [lm.tokenizer(chat_text(lm.tokenizer, t), add_special_tokens=False, return_tensors="pt").input_ids
            for t in prompts]


def compare_finetuned(base: LoadedModel, tuned: LoadedModel, inputs: list[torch.Tensor]
                      ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Per head: JS divergence and entropy change averaged over ``inputs`` (``(1, T)`` ids each); and
    side-by-side patterns, on the first input, of the head that moved most. Returns (per-head frame, patterns)."""
    acc: dict[str, torch.Tensor] = {}
    for ids in inputs:
        for k, v in att.compare_patterns(att.patterns_for(base.model, ids), att.patterns_for(tuned.model, ids)).items():
            acc[k] = acc.get(k, 0) + v / len(inputs)
    heads = att.head_frame(acc).sort("js_bits", descending=True).with_columns(
        pl.int_range(1, pl.len() + 1).alias("rank"))
    top = heads.row(0, named=True)
    ids = inputs[0]
    labels = att.token_labels(base.tokenizer, ids[0].tolist())
    lh = [(top["layer"], top["head"])]
    tag = f"L{top['layer']} H{top['head']}"
    pats = pl.concat([
        att.pattern_frame(att.patterns_for(base.model, ids), labels, lh, head_label=f"base · {tag}"),
        att.pattern_frame(att.patterns_for(tuned.model, ids), labels, lh, head_label=f"fine-tuned · {tag}"),
    ])
    return heads.sort("layer", "head"), pats


def shift_summary(heads: pl.DataFrame, prefix: str) -> dict[str, Any]:
    """Headline numbers of a per-head comparison frame, keys prefixed (``general_``, ``task_``)."""
    top = heads.sort("js_bits", descending=True)
    total = max(float(heads["js_bits"].sum()), 1e-30)
    by_layer = heads.group_by("layer").agg(pl.col("js_bits").sum()).sort("js_bits", descending=True)
    k = max(1, heads.height // 20)
    return {f"{prefix}{key}": v for key, v in {
        "max_js_bits": top["js_bits"][0], "max_js_layer": top["layer"][0], "max_js_head": top["head"][0],
        "mean_js_bits": heads["js_bits"].mean(), "median_js_bits": heads["js_bits"].median(),
        "top5pct_heads": k, "top5pct_js_share": float(top["js_bits"].head(k).sum()) / total,
        "top_layer_by_js": by_layer["layer"][0], "top_layer_js_share": float(by_layer["js_bits"][0]) / total,
        "mean_entropy_change": heads["entropy_change"].mean(),
        "max_abs_entropy_change": float(heads["entropy_change"].abs().max()),
    }.items()}


# ----------------------------------------------------------------------------- the track


def run(profile: str | Profile | None = None, *, fresh: bool = False, write: bool = True, progress: bool = True,
        finetune: bool = True) -> dict:
    """Measure head scores, pattern examples, capture memory and base vs fine-tuned; write them to
    results/B_attention/. Returns the summary row.

    Args:
        profile: Profile name or object (default ``cpu``).
        fresh: Accepted for the CLI; this track keeps no checkpoints (everything is recomputed).
        write: Write results (``False``: compute and return the summary only).
        progress: tqdm bars.
        finetune: Compare base and fine-tuned attention. Needs Track A's adapter
            (``lab run A_finetuning --profile <profile>`` first; ``lab run all`` runs it before this track); a
            missing adapter raises :class:`LabError` before any work, except on smoke, which trains its own tiny
            LoRA instead. ``False`` skips the comparison (and writes none of its results).
    """
    p = get_profile(profile)
    if p.threads:
        torch.set_num_threads(p.threads)
    cfg = config_for(p)
    tuned_from = None
    if finetune:
        adapter, tuned_from = resolve_adapter(p)  # a missing adapter fails here, before the long work
    lm = load_model(p)
    shape = model_shape(lm.model)
    config = {"attention": asdict(cfg), "model": lm.name, "shape": shape, "prompts": list(PROMPTS),
              "pattern_prompt": PATTERN_PROMPT, "task_prompts": list(TASK_PROMPTS)}
    with Stopwatch() as sw_heads:
        heads = head_table(lm, cfg, progress=progress)
    with Stopwatch() as sw_ex:
        examples = pattern_examples(lm, heads)
    with Stopwatch() as sw_mem:
        memory, guard = memory_table(lm, cfg)
    T_ind = cfg.induction_len * 2 + len(bos_ids(lm))
    mean_len = sum(encode(lm, t).shape[1] for t in PROMPTS) / len(PROMPTS)
    top = {m: heads.sort(m, descending=True).row(0, named=True) for m in ("prev_token", "induction", "sink_share")}
    n_heads_total = heads.height
    summary: dict[str, Any] = {
        "model": lm.name, "n_layers": shape["n_layers"], "n_heads": shape["n_heads"], "n_kv_heads": shape["n_kv_heads"],
        "n_prompts": len(PROMPTS), "mean_prompt_tokens": mean_len,
        "mean_sink_share": heads["sink_share"].mean(),
        "heads_sink_over_half": int((heads["sink_share"] > 0.5).sum()),
        "share_heads_sink_over_half": float((heads["sink_share"] > 0.5).mean()),
        "n_heads_total": n_heads_total,
        "mean_entropy_norm": heads["entropy_norm"].mean(),
        "top_prev_layer": top["prev_token"]["layer"], "top_prev_head": top["prev_token"]["head"],
        "top_prev_score": top["prev_token"]["prev_token"],
        "heads_prev_over_half": int((heads["prev_token"] > 0.5).sum()),
        "top_induction_layer": top["induction"]["layer"], "top_induction_head": top["induction"]["head"],
        "top_induction_score": top["induction"]["induction"],
        "heads_induction_over_half": int((heads["induction"] > 0.5).sum()),
        "chance_induction": att.uniform_induction_score(cfg.induction_len, len(bos_ids(lm))),
        "induction_tokens": T_ind,
        "top_induction_sink_share": top["induction"]["sink_share"],
        "induction_head_layers": _layers_over(heads, "induction", 0.5),
        "prev_head_layers": _layers_over(heads, "prev_token", 0.5),
        "top_sink_layer": top["sink_share"]["layer"], "top_sink_head": top["sink_share"]["head"],
        "top_sink_score": top["sink_share"]["sink_share"],
        "first_layer_sink_over_half": _first_layer(heads, "sink_share", 0.5),
        "heads_seconds": sw_heads.seconds,
    }
    for half, cond in (("early", pl.col("layer") < shape["n_layers"] // 2), ("late", pl.col("layer") >= shape["n_layers"] // 2)):
        sub = heads.filter(cond)
        summary[f"sink_share_{half}"] = sub["sink_share"].mean()
        summary[f"entropy_norm_{half}"] = sub["entropy_norm"].mean()
    g = guard.row(0, named=True)
    summary.update({"guard_tokens": g["tokens"], "guard_estimate_gib": g["pattern_estimate_gib"],
                    "guard_refused": g["refused"], "budget_gib": g["budget_gib"]})
    tuned_rows = None
    if tuned_from is not None:
        with Stopwatch() as sw_ft:
            tuned = load_tuned(p, adapter)
            ft_general, _ = compare_finetuned(lm, tuned, [encode(lm, t) for t in PROMPTS])
            ft_task, ft_pats = compare_finetuned(lm, tuned, task_prompt_ids(lm))
        tuned_rows = {"adapter_source": tuned_from, "adapter_dir": _shown_path(adapter),
                      **shift_summary(ft_general, "general_"), **shift_summary(ft_task, "task_"),
                      "task_over_general_mean_js": float(ft_task["js_bits"].mean() / max(ft_general["js_bits"].mean(), 1e-30)),
                      "seconds": sw_ft.seconds}
        summary["finetune_compared"] = True
    else:
        summary["finetune_compared"] = False
    if not write:
        return summary
    common = {"config": config, "seed": cfg.seed, "profile": p.name}
    write_result(TRACK, "heads", heads, chart=lambda f: att.plot_head_grid(f, titles={
        "entropy_norm": "entropy / uniform", "sink_share": "first-token share", "prev_token": "previous-token score",
        "induction": "induction score"}), wall_time_s=sw_heads.seconds, **common)
    write_result(TRACK, "layers", att.layer_profile(heads), chart=att.plot_layer_profile, wall_time_s=sw_heads.seconds,
                 **common)
    write_result(TRACK, "top_heads", top_heads(heads), wall_time_s=sw_heads.seconds, **common)
    write_result(TRACK, "patterns", examples, chart=att.plot_patterns, wall_time_s=sw_ex.seconds, **common)
    write_result(TRACK, "memory", memory, chart=att.plot_memory, wall_time_s=sw_mem.seconds, **common)
    write_result(TRACK, "guard", guard, wall_time_s=sw_mem.seconds, **common)
    if tuned_rows is not None:
        ft_common = dict(common, config={**config, "adapter": str(adapter), "adapter_source": tuned_from})
        write_result(TRACK, "finetune_heads", ft_general, chart=att.plot_head_shift, wall_time_s=sw_ft.seconds,
                     **ft_common)
        write_result(TRACK, "finetune_heads_task", ft_task, chart=att.plot_head_shift, wall_time_s=sw_ft.seconds,
                     **ft_common)
        write_result(TRACK, "finetune_top", ft_task.sort("js_bits", descending=True).head(10),
                     wall_time_s=sw_ft.seconds, **ft_common)
        write_result(TRACK, "finetune_patterns", ft_pats, chart=att.plot_patterns, wall_time_s=sw_ft.seconds,
                     **ft_common)
        write_result(TRACK, "finetune_summary", pl.DataFrame([tuned_rows]), wall_time_s=sw_ft.seconds, **ft_common)
    total = sw_heads.seconds + sw_ex.seconds + sw_mem.seconds
    write_result(TRACK, "summary", pl.DataFrame([summary]), wall_time_s=total, **common)
    return summary


def _first_layer(heads: pl.DataFrame, metric: str, threshold: float) -> int:
    """First layer with a head whose ``metric`` exceeds ``threshold`` (-1 if none)."""
    hit = heads.filter(pl.col(metric) > threshold)
    return int(hit["layer"].min()) if hit.height else -1


def _layers_over(heads: pl.DataFrame, metric: str, threshold: float) -> str:
    """Comma-separated layers that hold a head with ``metric > threshold`` ("none" if none)."""
    layers = sorted(set(heads.filter(pl.col(metric) > threshold)["layer"].to_list()))
    return ", ".join(map(str, layers)) or "none"


def top_heads(heads: pl.DataFrame, k: int = 4) -> pl.DataFrame:
    """The ``k`` strongest heads by previous-token score, induction score and first-token share (one table)."""
    frames = []
    for metric, title in (("prev_token", "previous-token"), ("induction", "induction"), ("sink_share", "first-token sink")):
        frames.append(heads.sort(metric, descending=True).head(k).with_columns(pl.lit(title).alias("ranked_by")))
    return pl.concat(frames).select("ranked_by", "layer", "head", "prev_token", "induction", "sink_share", "entropy_norm")

