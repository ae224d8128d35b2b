"""Where things live: the one module that knows locations on disk.

- ``REPO_ROOT``: the checkout (results/, site-src/, docs/, mkdocs.yml).
- :func:`data_dir`: git-ignored inputs and work in progress (``.data/``, or ``$LAB_DATA_DIR``): the SmolLM2 GGUF,
  the Shakespeare texts, cached model copies, checkpoints, adapters and transcoders.
- :func:`results_root`: committed results (``results/``, or ``$LAB_RESULTS_DIR``); profiles other than ``cpu``
  write to ``results/<profile>/``.

Both environment variables are read at call time, so tests and subprocesses can redirect them.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROFILE = "cpu"  # its results are the committed ones, at the top of results/


def data_dir() -> Path:
    """The folder of downloaded inputs and resumable work (``$LAB_DATA_DIR``, default ``<repo>/.data``)."""
    return Path(os.environ.get("LAB_DATA_DIR", REPO_ROOT / ".data"))


def results_root(profile: str = DEFAULT_PROFILE) -> Path:
    """Where a profile's results go: ``results/`` for the default ``cpu`` profile, ``results/<profile>/`` otherwise.

    ``LAB_RESULTS_DIR`` overrides the base folder (tests use it).
    """
    base = Path(os.environ.get("LAB_RESULTS_DIR", REPO_ROOT / "results"))
    return base if profile == DEFAULT_PROFILE else base / profile


def track_results(track: str, profile: str = DEFAULT_PROFILE) -> Path:
    """The results folder of one track: ``results_root(profile) / track``."""
    return results_root(profile) / track


def checkpoint_dir(profile: str, track: str, *parts: str) -> Path:
    """Resumable work of a track (checkpoints, cached runs): ``.data/checkpoints/<profile>/<track>/<parts...>``."""
    return data_dir().joinpath("checkpoints", profile, track, *parts)


def adapter_dir(profile: str, track: str, name: str = "main") -> Path:
    """A saved LoRA adapter: ``.data/adapters/<profile>/<track>/<name>``."""
    return data_dir() / "adapters" / profile / track / name


def model_cache_dir() -> Path:
    """Safetensors copies of models loaded once from slower formats (the SmolLM2 GGUF)."""
    return data_dir() / "models"


def transcoder_dir(profile: str) -> Path:
    """Per-layer transcoders trained by ``lab transcoders build`` for a profile's model."""
    return data_dir() / "transcoders" / profile


def shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (for messages and provenance), else as given."""
    try:
        return Path(path).resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(path)
