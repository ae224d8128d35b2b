"""What every track notebook does the same way: tell script mode from app mode, and fail a script run cleanly.

A notebook runs three ways: ``marimo edit``, ``marimo run`` (read-only app), and ``python notebooks/x.py --
--profile cpu`` (a script that writes results/). In script mode there is no UI, the CLI arguments choose the
profile, and a mistake the user can fix ends the script with one line on stderr and a non-zero exit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from lab.errors import LabError
from lab.profiles import Profile, activate, get_profile

T = TypeVar("T")


def script_mode(mo: Any) -> tuple[bool, dict[str, Any]]:
    """``(True, CLI arguments)`` when the notebook runs as a script, else ``(False, {})``."""
    script = mo.app_meta().mode == "script"
    return script, (dict(mo.cli_args()) if script else {})


def or_exit(track: str, fn: Callable[[], T]) -> T:
    """Call ``fn``; a :class:`LabError`, or an everyday :class:`OSError` (disk full, permission denied), becomes
    ``SystemExit("<track>: error: ...")`` (exit status 1, one line, as the ``lab`` command prints it)."""
    try:
        return fn()
    except LabError as err:
        raise SystemExit(f"{track}: error: {err}") from None
    except OSError as err:
        from lab.cli import os_error_line

        raise SystemExit(f"{track}: error: {os_error_line(err)}") from None


def script_profile(track: str, cli: dict[str, Any]) -> Profile:
    """The profile named by ``--profile`` (default ``cpu``), with its settings applied, or a one-line exit listing
    the valid names."""
    return or_exit(track, lambda: activate(get_profile(cli.get("profile"))))
