"""How the site writes a number or a table cell: meaningful digits, not raw floats.

- integers (and floats that are whole numbers) as integers, with thousands separators: ``12,447``;
- other numbers to three significant digits (``0.0107``, ``1.98``, ``123``), whole numbers from 1,000 up;
- small numbers (below 0.001, p-values and differences among them) in scientific notation: ``2.4 × 10⁻⁷``;
- ``fmt`` overrides: any Python format spec (``".3f"``, ``".0%"``, ``",.0f"``), or ``"min"`` for seconds written as
  minutes (``2578.5`` -> ``43 min``).
"""

from __future__ import annotations

import html
import math
import re
from typing import Any

from lab.errors import LabError

_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")
_MD_SPECIALS = re.compile(r"([\\`*_{}\[\]()#+\-.!|$~^])")


def format_number(value: float) -> str:
    """A number to meaningful digits (see the module docstring)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value):,}"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 1e-3:
        return f"{value:.3g}"
    mantissa, exponent = f"{value:.2e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa} × 10{str(int(exponent)).translate(_SUPERSCRIPT)}"


def format_cell(value: Any, fmt: str | None = None) -> str:
    """One value as the site writes it: ``fmt`` if given (a format spec, or ``"min"``), else :func:`format_number`
    for numbers, ``yes``/``no`` for booleans and text as it is; ``None`` is a dash."""
    if value is None:
        return "—"
    if fmt == "min":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise LabError(f"format 'min' (seconds as minutes) needs a number, not {value!r}")
        return f"{value / 60:,.0f} min"
    if fmt:
        try:
            return format(value, fmt)
        except (ValueError, TypeError) as e:
            raise LabError(f"format {fmt!r} does not fit {value!r}: {e}") from e
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return format_number(value)
    return str(value)


def human_header(column: str) -> str:
    """A column name as a header when the page gives none: ``final_eval_loss`` -> ``Final eval loss``."""
    text = column.replace("_", " ").strip()
    return text[:1].upper() + text[1:]


def escape_markdown_cell(text: str) -> str:
    """Make arbitrary text safe inside a Markdown table cell (pipes, newlines, HTML, math, emphasis)."""
    text = html.escape(text, quote=False)
    # Numeric character references, not backslashes: "\\(" would open arithmatex math.
    text = _MD_SPECIALS.sub(lambda m: f"&#{ord(m.group(1))};", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
    return text.replace("\n", "<br>")
