"""Track registry: each track module exposes ``run(profile, **options) -> dict`` that writes results/<track>/."""

from __future__ import annotations

import importlib
from types import ModuleType

from lab.errors import LabError

# name -> module path; a track is listed here only once it runs end to end.
TRACKS: dict[str, str] = {
    "pretrain": "lab.tracks.pretrain.run",
    "A_finetuning": "lab.tracks.A_finetuning.run",
    "B_attention": "lab.tracks.B_attention.run",
    "C_probing": "lab.tracks.C_probing.run",
    "D_bayes": "lab.tracks.D_bayes.run",
    "E_circuits": "lab.tracks.E_circuits.run",
}


def get_track(name: str) -> ModuleType:
    """The module of track ``name``; unknown names list the available ones."""
    if name not in TRACKS:
        raise LabError(f"unknown track {name!r}: choose one of {', '.join(TRACKS)} (or 'all')")
    return importlib.import_module(TRACKS[name])
