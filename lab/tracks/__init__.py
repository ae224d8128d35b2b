"""The tracks and their registry.

Every track is a package with the same files: ``config.py`` (its recipe per profile), ``run.py`` (``run(profile,
...) -> Summary``: the outline that trains, analyses and writes ``results/<track>/``), ``frames.py`` (analysis
to polars frames), ``charts.py`` (frames to Altair, encoding only) and ``summary.py`` (the headline numbers the
site quotes). Tracks import the library, never each other.
"""

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


def headlines() -> dict[str, tuple[str, ...]]:
    """Each track's headline summary fields (``HEADLINES`` in its ``summary.py``), in track order."""
    return {name: importlib.import_module(f"lab.tracks.{name}.summary").HEADLINES for name in TRACKS}
