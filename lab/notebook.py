"""What every track notebook does the same way: tell script mode from app mode, fail a script run cleanly, and
show a person numbers and tables they can read (the ``lab`` command prints summaries with the same helpers).

A notebook runs three ways: ``marimo edit``, ``marimo run`` (read-only app), and ``python notebooks/x.py --
--profile cpu`` (a script that writes results/). In script mode there is no UI, the CLI arguments choose the
profile, and a mistake the user can fix ends the script with one line on stderr and a non-zero exit.

Numbers are written as the site writes them (:func:`lab.site.formatting.format_number`: meaningful digits), rates
and shares as percentages, seconds as a duration; tables show the columns a reader needs under human headers.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
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


# ----------------------------------------------------------------------------------------- numbers for a person

PERCENT_SUFFIXES = ("_rate", "accuracy", "_share", "_fraction")  # a field named so is a share of 1: shown in %


def kind_of(field: str) -> str | None:
    """``"%"`` for a rate or share (``exact_rate``, ``mean_sink_share``), ``"s"`` for seconds (``wall_s``,
    ``train_time_s``), else ``None``, read from the field's name."""
    if field.endswith(PERCENT_SUFFIXES):
        return "%"
    if field.endswith("_s") and not field.endswith("_per_s"):
        return "s"
    return None


def duration(seconds: float) -> str:
    """``853 ms``, ``2.7 s``, ``42 s``, ``12 min``, ``1.4 h``."""
    if seconds < 1:
        return f"{seconds * 1000:.3g} ms"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def number(value: Any, kind: str | None = None) -> str:
    """One value for a person: ``kind`` ``"%"`` writes a share of 1 as a percentage (``46.7 %``), ``"s"`` seconds
    as a duration; other numbers to meaningful digits (``0.0107``, ``1.83``, ``17,284``), booleans ``yes``/``no``,
    missing values and NaN a dash."""
    from lab.site.formatting import format_number

    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if not isinstance(value, int | float):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return "—"
    if kind == "%" and math.isfinite(value):
        percent = f"{value * 100:.1f}".removesuffix(".0")
        return f"{percent} %"
    if kind == "s" and math.isfinite(value):
        return duration(value)
    return format_number(value)


def label(field: str) -> str:
    """A field name as words: ``final_val_loss`` -> ``final val loss``, ``tokens_per_s`` -> ``tokens/s``."""
    return field.replace("_per_s", "/s").replace("_", " ")


_FIELD_NOTE = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+?)\s*$")


def field_notes(cls: type) -> dict[str, str]:
    """The trailing comment of every field of a summary dataclass (and its bases), keyed by field name."""
    notes: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        notes |= {m[1]: m[2].removeprefix("... ") for line in lines if (m := _FIELD_NOTE.match(line))}
    return notes


def headline_rows(summary: Any, fields: Sequence[str]) -> list[tuple[str, str, str]]:
    """``(quantity, value, meaning)`` of each headline field of a track's summary, formatted for a person."""
    values, notes = summary.as_dict(), field_notes(type(summary))
    return [(label(f), number(values[f], kind_of(f)), notes.get(f, "")) for f in fields if f in values]


# ----------------------------------------------------------------------------------------- app widgets


def headlines(mo: Any, summary: Any, fields: Sequence[str]) -> Any:
    """The summary's headline numbers as a three-column table (the full summary has dozens of fields: every one
    of them is in ``summary.parquet``)."""
    rows = [{"quantity": q, "value": v, "meaning": m} for q, v, m in headline_rows(summary, fields)]
    return mo.ui.table(rows, selection=None, pagination=False, show_column_summaries=False, show_download=False)


def table(
    mo: Any,
    frame: Any,
    columns: Mapping[str, str] | Sequence[str] | None = None,
    *,
    percent: Sequence[str] = (),
    page_size: int = 10,
) -> Any:
    """A polars frame as a table a person reads: only ``columns`` (a mapping column -> header, or names), in that
    order, numbers formatted (:func:`number`; ``percent`` columns, or columns named as rates or shares, in %),
    without marimo's column summaries and data types. The download button still gives the raw values."""
    if columns is None:
        columns = {c: label(c) for c in frame.columns}
    elif not isinstance(columns, Mapping):
        columns = {c: label(c) for c in columns}
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise LabError(f"table: no column {', '.join(missing)} (the frame has {', '.join(frame.columns)})")
    shown = frame.select(list(columns)).rename(dict(columns))
    kinds = {header: "%" if col in percent else kind_of(col) for col, header in columns.items()}
    formats = {
        header: (lambda v, kind=kind: number(v, kind))
        for header, kind in kinds.items()
        if shown[header].dtype.is_numeric()
    }
    return mo.ui.table(
        shown,
        selection=None,
        format_mapping=formats,
        page_size=page_size,
        pagination=shown.height > page_size,
        show_column_summaries=False,
        show_data_types=False,
    )


def progress(mo: Any, done: int, total: int, text: str = "") -> Any:
    """A progress bar drawn with plain HTML (visible in every theme), with ``done/total`` and ``text`` below."""
    share = 0 if total <= 0 else min(1.0, done / total)
    return mo.Html(
        "<div style='margin:0.5em 0'>"
        "<div style='height:0.6em;border-radius:0.3em;background:#8884;overflow:hidden'>"
        f"<div style='height:100%;width:{share * 100:.1f}%;background:#2e7d32'></div></div>"
        f"<small>{done:,}/{total:,} ({share:.0%}){' · ' + text if text else ''}</small></div>"
    )


def profile_picker(mo: Any, meanings: Mapping[str, str], value: str = "cpu", text: str = "profile") -> tuple:
    """``(dropdown, legend)``: a profile selector over ``meanings``' names and, to show beside it, what each
    profile means for this notebook (``smoke``'s numbers come from generated text and tiny random models)."""
    dropdown = mo.ui.dropdown(options=list(meanings), value=value, label=text)
    legend = mo.md("  \n".join(f"**{name}**: {meaning}" for name, meaning in meanings.items()))
    return dropdown, legend
