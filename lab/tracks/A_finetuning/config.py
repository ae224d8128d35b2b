"""Track A's recipes: the main LoRA run per profile, and the plan of runs the six experiments share.

The main run's settings are :class:`~lab.train.lora.FinetuneConfig`'s defaults (the ``cpu`` recipe); ``smoke`` and
``gpu`` override what differs. Every other run of the track changes one thing from the main run (:func:`plan`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from lab import paths
from lab.errors import LabError
from lab.profiles import Profile
from lab.train.lora import FinetuneConfig

TRACK = "A_finetuning"

RECIPES: dict[str, FinetuneConfig] = {
    # seconds: a tiny random Llama, 16 training prompts, 2 epochs of batch 4 (8 steps)
    "smoke": FinetuneConfig(
        lr=2e-3,
        rank=4,
        batch_size=4,
        epochs=2,
        n_train=16,
        n_test=6,
        n_evals=4,
        max_seq_len=160,
        max_new_tokens=12,
    ),
    # SmolLM2-135M-Instruct on 2 cores: LoRA r8 on every projection, LR 2e-4, batch 8, 3 epochs of 100 examples
    "cpu": FinetuneConfig(),
    # Qwen2.5-7B-Instruct, QLoRA (4-bit NormalFloat base)
    "gpu": FinetuneConfig(
        rank=16,
        batch_size=16,
        n_train=400,
        n_test=100,
        max_seq_len=160,
        quant="nf4",
    ),
}

# The sweeps: each changes one setting of the main run (a value equal to the main run's is the main run itself).
LR_SWEEP = (1e-5, 1e-3, 5e-3)  # learning rates beside the main run's
RANK_SWEEP = (1, 16, 64)  # LoRA ranks beside the main run's
# Batch x LR: half and double the main run's batch size, each with the LR scaled linearly and kept constant.


def config_for(profile: Profile) -> FinetuneConfig:
    """The main run's config for ``profile``."""
    try:
        return RECIPES[profile.name]
    except KeyError:
        raise LabError(
            f"Track A has no recipe for profile {profile.name!r}: add one to RECIPES in "
            f"lab/tracks/A_finetuning/config.py (known: {', '.join(RECIPES)})"
        ) from None


def final_adapter_dir(profile: Profile) -> Path:
    """Where the main run's final LoRA adapter is saved: Track A's output that other tracks read (B compares the
    base and the fine-tuned model's attention)."""
    return paths.adapter_dir(profile.name, TRACK, "main")


@dataclass(frozen=True)
class RunSpec:
    """One fine-tuning run of the track and the experiments (groups) it belongs to."""

    name: str  # unique; also names its checkpoint folder
    cfg: FinetuneConfig
    groups: tuple[str, ...]  # experiments that show this run: anatomy, lr, rank, batch, qlora, moments
    rule: str = ""  # batch x LR experiment: "linear" (LR scaled with batch), "constant", or "both" (the main run)

    def __post_init__(self) -> None:
        if self.rule not in ("", "linear", "constant", "both"):
            raise LabError(
                f"RunSpec {self.name!r}: rule must be '', 'linear', 'constant' or 'both' (got {self.rule!r})"
            )
        if not self.groups:
            raise LabError(f"RunSpec {self.name!r} belongs to no experiment: name at least one group")


def plan(cfg: FinetuneConfig) -> list[RunSpec]:
    """Every run of the track; ``main`` first (it is the anatomy run and the baseline of each sweep)."""
    runs = [RunSpec("main", cfg, ("anatomy", "lr", "rank", "batch", "qlora", "moments"), rule="both")]
    runs += [RunSpec(f"lr={lr:g}", replace(cfg, lr=lr), ("lr",)) for lr in LR_SWEEP if lr != cfg.lr]
    runs += [RunSpec(f"rank={r}", replace(cfg, rank=r), ("rank",)) for r in RANK_SWEEP if r != cfg.rank]
    for b in (cfg.batch_size // 2, cfg.batch_size * 2):
        for rule, lr in (("linear", cfg.lr * b / cfg.batch_size), ("constant", cfg.lr)):
            runs.append(RunSpec(f"batch={b}, lr={lr:g}", replace(cfg, batch_size=b, lr=lr), ("batch",), rule))
    if cfg.quant == "none":
        runs.append(RunSpec("qlora", replace(cfg, quant="nf4"), ("qlora",)))
    return runs
