"""Profiles: one frozen dataclass per way of running the lab, chosen by name.

- ``smoke``: tiny random models and tiny generated data; seconds. What tests and CI use.
- ``cpu`` (default): real models on a 2-core CPU (SmolLM2-135M-Instruct from a PyPI wheel).
- ``gpu``: Qwen2.5-7B-Instruct in 4-bit (unsloth + bitsandbytes), Gemma-2-2B for circuits; needs CUDA + the hub.

A profile says where and with what the lab runs; each track's recipe for it lives in
``lab/tracks/<track>/config.py`` (``RECIPES[profile.name]``, read through ``config_for(profile)``).
"""

from __future__ import annotations

from dataclasses import dataclass

from lab.errors import LabError


@dataclass(frozen=True)
class Profile:
    """Everything that differs between ways of running the lab."""

    name: str
    description: str
    device: str
    corpus: str  # "smoke" (generated) or "shakespeare"
    lm: str  # language model used by the fine-tuning / interpretability tracks
    threads: int | None = None  # torch threads; None = torch's default

    def require_device(self) -> str:
        """The profile's torch device, or a :class:`LabError` naming the fix when this machine lacks it (a ``gpu``
        run must not fall back to the CPU and label its results ``gpu``)."""
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise LabError(
                    f"profile {self.name!r} runs on a CUDA GPU and this machine has none "
                    f"(torch.cuda.is_available() is False): use --profile cpu"
                )
        elif self.device != "cpu":
            raise LabError(f"profile {self.name!r} names the device {self.device!r}: the lab runs on 'cpu' or 'cuda'")
        return self.device


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        description="tiny random models and generated text; seconds (tests, CI)",
        device="cpu",
        corpus="smoke",
        lm="tiny-llama",
        threads=1,
    ),
    "cpu": Profile(
        name="cpu",
        description="real SmolLM2-135M-Instruct and nanoGPT's CPU recipe on a 2-core laptop (default)",
        device="cpu",
        corpus="shakespeare",
        lm="smollm2-135m",
    ),
    "gpu": Profile(
        name="gpu",
        description="Qwen2.5-7B-Instruct 4-bit and nanoGPT's GPU recipe; needs CUDA and the Hugging Face hub",
        device="cuda",
        corpus="shakespeare",
        lm="Qwen/Qwen2.5-7B-Instruct",
    ),
}

DEFAULT_PROFILE = "cpu"


def activate(profile: Profile) -> Profile:
    """Check that the profile's device is here and apply its process-wide settings (torch threads), once, at the
    edge: the CLI or a notebook. Nothing has been computed when it refuses."""
    profile.require_device()
    if profile.threads:
        import torch

        torch.set_num_threads(profile.threads)
    return profile


def get_profile(name: str | Profile | None = None) -> Profile:
    """Return the profile called ``name`` (default ``cpu``); unknown names list the valid ones."""
    if isinstance(name, Profile):
        return name
    name = DEFAULT_PROFILE if name is None else name
    try:
        return PROFILES[name]
    except KeyError:
        valid = ", ".join(PROFILES)
        raise LabError(f"unknown profile {name!r}: choose one of {valid}") from None
