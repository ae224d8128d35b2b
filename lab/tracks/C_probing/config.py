"""Track C's recipes: what the residual-stream track measures on each profile."""

from __future__ import annotations

from dataclasses import dataclass

from lab.data.prompts import PROMPTS
from lab.errors import LabError
from lab.profiles import Profile

TRACK = "C_probing"


@dataclass(frozen=True)
class ProbingConfig:
    """What the track measures. Defaults are the ``cpu`` profile's (SmolLM2-135M on a 2-core CPU)."""

    lens_prompt: int = 0  # index into PROMPTS shown as the logit-lens and per-token charts
    similarity_maps: int = 4  # layers shown as position x position maps (evenly spaced, last included)
    architecture_tokens: int = 40  # tokens per sequence of the architecture table (> the tiny Gemma2's window, 16)
    bench_tokens: int = 256  # sequence length of the capture benchmark
    bench_reps: int = 10  # its timed repetitions (interleaved round-robin, median reported)
    bench_warmup: int = 2  # its untimed repetitions first
    seed: int = 0  # the architecture table's random tokens and tiny models

    def __post_init__(self) -> None:
        if not 0 <= self.lens_prompt < len(PROMPTS):
            raise LabError(
                f"lens_prompt must index one of the {len(PROMPTS)} prompts (0..{len(PROMPTS) - 1}), "
                f"got {self.lens_prompt}"
            )
        if self.similarity_maps < 1:
            raise LabError(f"similarity_maps must be >= 1 (got {self.similarity_maps}); the default is 4")
        if self.architecture_tokens <= 16:
            raise LabError(
                f"architecture_tokens must exceed 16, the tiny Gemma2's sliding window (got "
                f"{self.architecture_tokens}), or its local-attention layers go untested; the default is 40"
            )
        if self.bench_tokens < 1 or self.bench_reps < 1 or self.bench_warmup < 0:
            raise LabError(
                f"the benchmark needs bench_tokens >= 1, bench_reps >= 1 and bench_warmup >= 0 (got "
                f"{self.bench_tokens}, {self.bench_reps}, {self.bench_warmup})"
            )


# SmolLM2-135M-Instruct on two cores: ~2 min, benchmark included.
CPU = ProbingConfig(
    lens_prompt=0,
    similarity_maps=4,
    architecture_tokens=40,
    bench_tokens=256,
    bench_reps=10,
    bench_warmup=2,
    seed=0,
)

RECIPES: dict[str, ProbingConfig] = {
    # Tiny random Llama: seconds; a short benchmark.
    "smoke": ProbingConfig(
        lens_prompt=0,
        similarity_maps=4,
        architecture_tokens=40,
        bench_tokens=32,
        bench_reps=3,
        bench_warmup=1,
        seed=0,
    ),
    "cpu": CPU,
    "gpu": CPU,  # Qwen2.5-7B-Instruct in 4-bit: the same measurements
}


def config_for(profile: Profile) -> ProbingConfig:
    """The track's recipe for ``profile``."""
    return RECIPES[profile.name]
