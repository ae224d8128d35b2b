"""Track B's recipes: what the attention track measures on each profile, and the one input it takes from another
track (Track A's fine-tuned adapter)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lab import paths
from lab.errors import LabError
from lab.interp.capture import DEFAULT_MAX_BYTES
from lab.profiles import Profile
from lab.train.lora import FinetuneConfig

TRACK = "B_attention"


@dataclass(frozen=True)
class AttentionConfig:
    """What the track measures. Defaults are the ``cpu`` profile's (SmolLM2-135M on a 2-core CPU)."""

    induction_len: int = 25  # |R| in BOS + R + R, the repeated random sequence the induction score is read on
    induction_seqs: int = 8  # random sequences the induction score is averaged over
    memory_tokens: tuple[int, ...] = (64, 128, 256, 512)  # lengths whose every-layer pattern capture is measured
    stream_tokens: int = 1024  # a capture past the budget, streamed to disk layer by layer
    guard_tokens: int = 4096  # a long input the memory guard must refuse to capture in memory
    max_bytes: int = DEFAULT_MAX_BYTES  # the capture budget (bytes held in memory at once)
    seed: int = 0  # random sequences of the induction score

    def __post_init__(self) -> None:
        if self.induction_len < 2 or self.induction_seqs < 1:
            raise LabError(
                f"induction_len must be >= 2 and induction_seqs >= 1 (got {self.induction_len}, "
                f"{self.induction_seqs}): the induction score needs a repeated sequence of 2+ tokens"
            )
        if not self.memory_tokens or min(self.memory_tokens) < 3:
            raise LabError(
                f"memory_tokens must name at least one length of 3 or more tokens (got "
                f"{self.memory_tokens}), e.g. (64, 128, 256)"
            )
        if self.max_bytes <= 0:
            raise LabError(f"max_bytes must be > 0 (got {self.max_bytes}); the default is {DEFAULT_MAX_BYTES}")
        if not max(self.memory_tokens) < self.stream_tokens <= self.guard_tokens:
            raise LabError(
                f"lengths must grow: memory_tokens (max {max(self.memory_tokens)}) < stream_tokens "
                f"({self.stream_tokens}) <= guard_tokens ({self.guard_tokens}); the streamed capture and "
                "the guard's refusal are the cases past the in-memory ones"
            )


RECIPES: dict[str, AttentionConfig] = {
    # Tiny random Llama (2 layers, 4 heads): seconds.
    "smoke": AttentionConfig(
        induction_len=8,
        induction_seqs=2,
        memory_tokens=(16, 32, 64),
        stream_tokens=128,
        guard_tokens=256,
        max_bytes=1 << 20,  # 1 MiB, so that 256 tokens of patterns are refused
        seed=0,
    ),
    # SmolLM2-135M-Instruct (30 layers, 9 heads) on two cores: ~30 s plus the fine-tune comparison.
    "cpu": AttentionConfig(
        induction_len=25,
        induction_seqs=8,
        memory_tokens=(64, 128, 256, 512),
        stream_tokens=1024,
        guard_tokens=4096,
        max_bytes=DEFAULT_MAX_BYTES,  # 1 GiB
        seed=0,
    ),
    # Qwen2.5-7B-Instruct in 4-bit: the cpu recipe.
    "gpu": AttentionConfig(
        induction_len=25,
        induction_seqs=8,
        memory_tokens=(64, 128, 256, 512),
        stream_tokens=1024,
        guard_tokens=4096,
        max_bytes=DEFAULT_MAX_BYTES,
        seed=0,
    ),
}


def config_for(profile: Profile) -> AttentionConfig:
    """The track's recipe for ``profile``."""
    return RECIPES[profile.name]


# ----------------------------------------------------------------------------- input from Track A

FINETUNED_BY = "A_finetuning"  # the track whose main-run LoRA adapter the base-vs-fine-tuned comparison loads


def finetuned_adapter_dir(profile: Profile) -> Path:
    """Where Track A saves its final adapter for ``profile`` (``lab run A_finetuning`` makes it)."""
    return paths.adapter_dir(profile.name, FINETUNED_BY)


# Profiles whose comparison always uses the track's own stand-in LoRA, never Track A's adapter, so that their
# results do not depend on whether Track A ran first (its smoke adapter is a different LoRA). The stand-in: a few
# seeded LoRA steps on windows of the smoke corpus, trained once per data folder.
STAND_IN_PROFILES = ("smoke",)
STAND_IN_LORA = FinetuneConfig(
    lr=3e-2,
    rank=4,
    alpha_per_rank=2.0,  # lora_alpha 8
    dropout=0.0,
    target_modules=("q_proj", "k_proj", "v_proj"),
    batch_size=1,
    epochs=1,  # one pass over STAND_IN_STEPS windows: STAND_IN_STEPS optimiser steps
    warmup_ratio=0.0,
    scheduler="constant",
    seed=0,
)
STAND_IN_STEPS = 30  # training windows
STAND_IN_BLOCK = 32  # tokens per window
STAND_IN_CHARS = 4000  # of the smoke corpus, tokenised and cut into windows
