"""Track A's recipes: one fine-tuning config per profile."""

from __future__ import annotations

from pathlib import Path


from lab import paths
from lab.profiles import Profile, get_profile
from lab.train.lora import FinetuneConfig

TRACK = "A_finetuning"


# Per-profile defaults (overrides via dataclasses.replace).
CONFIGS: dict[str, FinetuneConfig] = {
    "smoke": FinetuneConfig(lr=2e-3, rank=4, batch_size=4, epochs=2, n_train=16, n_test=6, n_evals=4, max_seq_len=160,
                            max_new_tokens=12),
    "cpu": FinetuneConfig(),
    "gpu": FinetuneConfig(rank=16, batch_size=16, n_train=400, n_test=100, max_seq_len=160, quant="nf4"),
}


def finetune_config(profile: str | Profile | None = None) -> FinetuneConfig:
    """The default fine-tuning config of a profile."""
    return CONFIGS[get_profile(profile).name]


def final_adapter_dir(profile: str | Profile | None = None) -> Path:
    """Where the track's main run saves its final LoRA adapter (other tracks load it from here)."""
    return paths.adapter_dir(get_profile(profile).name, TRACK, "main")
