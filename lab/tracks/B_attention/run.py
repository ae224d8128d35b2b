"""Track B's outline: adapter -> head scores -> example patterns -> capture memory -> base vs fine-tuned -> summary
-> results/B_attention/."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import polars as pl

from lab import paths
from lab.data.corpus import smoke_text
from lab.data.prompts import PATTERN_PROMPT, PROMPTS, TASK_PROMPTS, encode
from lab.errors import LabError
from lab.interp.attention import layer_profile
from lab.interp.capture import model_shape
from lab.models.loading import LoadedModel, load_model
from lab.profiles import Profile
from lab.results import Stopwatch, result_set, write_result
from lab.tracks.B_attention import charts, config, frames
from lab.tracks.B_attention.summary import AttentionSummary, summarize
from lab.train.lora import load_adapter, save_adapter, train_lora

TRACK = config.TRACK


def run(
    profile: Profile, *, fresh: bool = False, write: bool = True, progress: bool = True, finetune: bool = True
) -> AttentionSummary:
    """Measure head scores, pattern examples, capture memory and base vs fine-tuned; write them to
    results/B_attention/.

    Args:
        profile: The profile (resolved at the edge).
        fresh: Accepted for the CLI; this track keeps no checkpoints (everything is recomputed).
        write: Write results (``False``: compute and return the summary only).
        progress: tqdm bars.
        finetune: Compare base and fine-tuned attention. Needs Track A's adapter
            (``lab run A_finetuning --profile <profile>`` first; ``lab run all`` runs it before this track); a
            missing adapter raises :class:`LabError` before any work. On smoke (``config.STAND_IN_PROFILES``) the
            track always uses a stand-in LoRA of its own, so that its results do not depend on the order tracks
            ran in. ``False`` skips the comparison (and writes none of its results).
    """
    cfg = config.config_for(profile)
    adapter, source = resolve_adapter(profile) if finetune else (None, None)  # fails here, before the long work
    lm = load_model(profile)
    with Stopwatch() as sw_heads:
        heads = frames.head_table(lm, cfg, progress=progress)
    with Stopwatch() as sw_examples:
        examples = frames.pattern_examples(lm, heads)
    with Stopwatch() as sw_memory:
        memory, guard = frames.memory_table(lm, cfg)
    finetuned, ft_seconds = compare(profile, lm, adapter, source) if adapter is not None else (None, 0.0)
    summary = summarize(lm, cfg, heads, guard, heads_seconds=sw_heads.seconds, finetune_compared=adapter is not None)
    if not write:
        return summary
    common = {
        "config": {
            "attention": asdict(cfg),
            "model": lm.name,
            "shape": model_shape(lm.model),
            "prompts": list(PROMPTS),
            "pattern_prompt": PATTERN_PROMPT,
            "task_prompts": list(TASK_PROMPTS),
        },
        "seed": cfg.seed,
        "profile": profile.name,
    }
    with result_set(TRACK, profile.name):  # every table and the summary published together
        write_result(TRACK, "heads", heads, chart=CHARTS["heads"], wall_time_s=sw_heads.seconds, **common)
        write_result(
            TRACK, "layers", layer_profile(heads), chart=CHARTS["layers"], wall_time_s=sw_heads.seconds, **common
        )
        write_result(TRACK, "top_heads", frames.top_heads(heads), wall_time_s=sw_heads.seconds, **common)
        write_result(TRACK, "patterns", examples, chart=CHARTS["patterns"], wall_time_s=sw_examples.seconds, **common)
        write_result(TRACK, "memory", memory, chart=CHARTS["memory"], wall_time_s=sw_memory.seconds, **common)
        write_result(TRACK, "guard", guard, wall_time_s=sw_memory.seconds, **common)
        if finetuned is not None:
            write_finetuned(finetuned, common, adapter=adapter, source=source, seconds=ft_seconds)
        total = sw_heads.seconds + sw_examples.seconds + sw_memory.seconds
        write_result(TRACK, "summary", summary.frame(), wall_time_s=total, **common)
    return summary


def compare(profile: Profile, lm: LoadedModel, adapter: Path, source: str) -> tuple[dict[str, pl.DataFrame], float]:
    """Base vs fine-tuned on the general and on the task prompts: the ``finetune_*`` results, and their seconds."""
    with Stopwatch() as sw:
        tuned = load_tuned(profile, adapter)
        general, _ = frames.compare_finetuned(lm, tuned, [encode(lm, t) for t in PROMPTS])
        task, task_patterns = frames.compare_finetuned(lm, tuned, frames.task_prompt_ids(lm))
    summary = frames.finetune_summary(general, task, source=source, adapter=_shown(adapter), seconds=sw.seconds)
    return {
        "finetune_heads": general,
        "finetune_heads_task": task,
        "finetune_top": frames.finetune_top(task),
        "finetune_patterns": task_patterns,
        "finetune_summary": summary,
    }, sw.seconds


# Result name -> its chart, called on the frame read back from the result's Parquet file (lab.results.rechart
# redraws them from the committed files).
CHARTS: dict[str, Callable[[pl.DataFrame], Any]] = {
    "heads": charts.heads,
    "layers": charts.layer_profile,
    "patterns": charts.patterns,
    "memory": charts.memory,
    "finetune_heads": charts.head_shift,
    "finetune_heads_task": charts.head_shift,
    "finetune_patterns": charts.patterns,
}


def write_finetuned(
    results: dict[str, pl.DataFrame], common: dict[str, Any], *, adapter: Path, source: str, seconds: float
) -> None:
    """The base-vs-fine-tuned results, their provenance naming the adapter."""
    ft_common = dict(common, config={**common["config"], "adapter": str(adapter), "adapter_source": source})
    with result_set(TRACK, common["profile"]):  # joins run()'s set
        for name, frame in results.items():
            write_result(TRACK, name, frame, chart=CHARTS.get(name), wall_time_s=seconds, **ft_common)


# ----------------------------------------------------------------------------- the fine-tuned adapter


def resolve_adapter(profile: Profile) -> tuple[Path, str]:
    """(adapter folder, where it came from). On the profiles of ``config.STAND_IN_PROFILES`` (smoke), always the
    track's stand-in, trained if needed, whether or not Track A ran; elsewhere Track A's adapter, and a missing one
    raises :class:`LabError` naming the command that makes it."""
    if profile.name in config.STAND_IN_PROFILES:
        return stand_in_adapter(profile), "smoke LoRA trained by the attention track"
    folder = config.finetuned_adapter_dir(profile)
    if (folder / "adapter_config.json").exists():
        return folder, "Track A (the fine-tuning track, main run)"
    raise LabError(
        f"no fine-tuned adapter at {folder}: run `lab run {config.FINETUNED_BY} --profile {profile.name}` "
        "first (the base-vs-fine-tuned comparison needs Track A's adapter)"
    )


def stand_in_adapter(profile: Profile) -> Path:
    """A tiny LoRA adapter (:data:`config.STAND_IN_LORA`) trained on windows of the smoke corpus with
    :func:`lab.train.lora.train_lora`; kept in ``.data/adapters/<profile>/B_attention/smoke-lora``."""
    folder = paths.adapter_dir(profile.name, TRACK, "smoke-lora")
    if (folder / "adapter_config.json").exists():
        return folder
    lm = load_model(profile)
    ids = lm.tokenizer(smoke_text()[: config.STAND_IN_CHARS], return_tensors="pt").input_ids[0]
    block = config.STAND_IN_BLOCK
    windows = [
        ids[i : i + block].tolist()
        for i in (  # strided starts through the text
            (step * 17) % max(1, len(ids) - block - 1) for step in range(config.STAND_IN_STEPS)
        )
    ]
    rows = [{"input_ids": w, "labels": w} for w in windows]
    result = train_lora(
        lm,
        config.STAND_IN_LORA,
        paths.checkpoint_dir(profile.name, TRACK, "smoke-lora"),
        rows=(rows, []),
        resume=False,
        instrument=False,
        do_eval=False,
        save=False,
        progress=False,
        desc="stand-in LoRA",
    )
    return save_adapter(result.model, folder)  # published whole (lab.io.publish_dir) or not at all


def load_tuned(profile: Profile, folder: Path) -> LoadedModel:
    """The profile's base model with the LoRA adapter in ``folder`` applied (a separate copy of the weights)."""
    lm = load_model(profile)
    return LoadedModel(model=load_adapter(lm, folder), tokenizer=lm.tokenizer, name=f"{lm.name}+LoRA", arch=lm.arch)


def _shown(path: Path) -> str:
    """An adapter path as results record it: relative to the data folder's parent (no machine-specific prefix)."""
    path = Path(path).resolve()
    try:
        return path.relative_to(paths.data_dir().resolve().parent).as_posix()
    except ValueError:
        return path.name
