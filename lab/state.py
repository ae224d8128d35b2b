"""Reading saved training state back (checkpoints, cached runs, logs beside them): a file that is missing, truncated
or corrupt becomes one :class:`LabError` naming it and the fix the caller gives (``--fresh``, or which file or folder
to delete), instead of a safetensors / polars / JSON / torch traceback.

Each reader catches only what its format's reader raises for damaged bytes, where the file is read.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import polars as pl
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from lab.errors import LabError
from lab.paths import shown

NOT_AN_ARCHIVE = "not a complete torch.save archive"


def damaged(path: Path, error: BaseException | str, fix: str) -> LabError:
    """The one message for a state file that cannot be used: ``<file> is truncated or corrupt (<why>): <fix>``."""
    if isinstance(error, FileNotFoundError):
        return LabError(f"{shown(path)} is missing: {fix}")
    why = error if isinstance(error, str) else (str(error).strip().splitlines() or [type(error).__name__])[0]
    why = why.split(". ")[0].removesuffix(".")  # the reader's first sentence (torch's go on about internals)
    return LabError(f"{shown(path)} is truncated or corrupt ({why[:160]}): {fix}")


def read_json(path: Path, fix: str) -> Any:
    """``json.loads`` of a UTF-8 file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, FileNotFoundError) as e:
        raise damaged(path, e, fix) from None


def read_parquet(path: Path, fix: str) -> pl.DataFrame:
    """``pl.read_parquet``."""
    try:
        return pl.read_parquet(path)
    except (pl.exceptions.PolarsError, FileNotFoundError) as e:
        raise damaged(path, e, fix) from None


def safetensors_metadata(path: Path, fix: str, required: tuple[str, ...] = ()) -> dict[str, str]:
    """The metadata of a safetensors file whose header covers the whole file (a truncated one fails here), with
    every key in ``required`` present."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, FileNotFoundError) as e:
        raise damaged(path, e, fix) from None
    missing = [k for k in required if k not in meta]
    if missing:
        raise damaged(path, f"its metadata lacks {', '.join(missing)}", fix)
    return meta


def load_safetensors(path: Path, fix: str) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file``."""
    try:
        return load_file(str(path))
    except (SafetensorError, FileNotFoundError) as e:
        raise damaged(path, e, fix) from None


def load_torch(path: Path, fix: str) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never arbitrary pickles."""
    if Path(path).exists() and not zipfile.is_zipfile(path):  # torch.save writes a zip archive; its index is last
        raise damaged(path, NOT_AN_ARCHIVE, fix)
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        raise damaged(path, "it holds objects other than tensors and plain containers: not loaded", fix) from None
    except (RuntimeError, EOFError, FileNotFoundError) as e:
        raise damaged(path, e, fix) from None


def check_torch_file(path: Path, fix: str) -> None:
    """A ``torch.save`` file (a zip archive) that is complete and whose every member matches its CRC, without
    unpickling it."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except FileNotFoundError as e:
        raise damaged(path, e, fix) from None
    except (zipfile.BadZipFile, EOFError):
        raise damaged(path, NOT_AN_ARCHIVE, fix) from None
    if bad is not None:
        raise damaged(path, f"{bad} fails its CRC check", fix)


def check_trainer_checkpoint(folder: Path, fix: str) -> None:
    """Every file transformers' ``Trainer`` resumes from in ``checkpoint-N/`` (adapter or model safetensors,
    optimizer / scheduler / RNG states, JSON states) is whole, before ``Trainer.train`` reads them."""
    for path in sorted(Path(folder).iterdir()):
        if path.suffix == ".safetensors":
            safetensors_metadata(path, fix)
        elif path.suffix in (".pt", ".pth", ".bin"):
            check_torch_file(path, fix)
        elif path.suffix == ".json":
            read_json(path, fix)
