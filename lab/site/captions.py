"""A chart caption must describe what the chart draws: every legend term it names exists in the chart, and every
line style it gives a series is the one drawn.

The convention the check reads (and the pages follow): a series, facet or legend entry is named in straight double
quotes, exactly as the chart labels it (``"mean over heads"``); quotations that are not chart labels (a prompt's
text) use typographic quotes (“…”). A quoted term followed by a line style, ``"mean over heads" (dashed)`` or
``"mean over heads", dashed``, is checked against the chart's ``strokeDash`` encoding (in a chart that draws no
dashes at all, every series is solid). A caption that says dashed or dotted at all needs a chart that draws dashes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

_TERM = re.compile(r'"([^"\n]+)"')
_TERM_STYLE = re.compile(r'"([^"\n]+)"(?:\s*\(|,\s*|\s+)(solid|dashed|dotted)\b')
_DASH_WORD = re.compile(r"\b(dashed|dotted)\b")
# Vega-Lite's default strokeDash range for a field (vega-lite's scale range defaults).
DEFAULT_DASHES = ([1, 0], [4, 2], [2, 1], [1, 1], [1, 2, 4, 2])
_LABEL_KEYS = ("field", "title", "as", "datum", "text")


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every dict in a spec, the inlined data left out."""
    if isinstance(node, dict):
        yield node
        for key, value in node.items():
            if key not in ("datasets", "values", "config", "$schema"):
                yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def _rows(spec: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [r for dataset in (spec.get("datasets") or {}).values() for r in dataset if isinstance(r, dict)]
    for node in _walk(spec):
        data = node.get("data")
        if isinstance(data, dict) and isinstance(data.get("values"), list):
            rows += [r for r in data["values"] if isinstance(r, dict)]
    return rows


def chart_terms(spec: dict[str, Any]) -> set[str]:
    """The strings a reader can see in a chart or that name what it encodes: the text values of its data, its field
    names, titles, datum and text labels, and the string domains of its scales."""
    terms = {v for row in _rows(spec) for v in row.values() if isinstance(v, str)}
    terms |= {k for row in _rows(spec) for k in row}
    for node in _walk(spec):
        for key in _LABEL_KEYS:
            value = node.get(key)
            if isinstance(value, str):
                terms.add(value)
            elif isinstance(value, list):
                terms |= {v for v in value if isinstance(v, str)}
        if isinstance(node.get("domain"), list):
            terms |= {v for v in node["domain"] if isinstance(v, str)}
    return {" ".join(t.split()) for t in terms}


def _style(dash: list[float] | None) -> str:
    if not dash or all(gap == 0 for gap in dash[1::2]):
        return "solid"
    return "dotted" if max(dash) <= 2 else "dashed"


def series_style(spec: dict[str, Any], term: str) -> str | None:
    """How the series ``term`` is stroked by a ``strokeDash`` field encoding (``None``: no such encoding has it)."""
    rows = _rows(spec)
    for node in _walk(spec):
        dash = node.get("strokeDash")
        if not (isinstance(dash, dict) and isinstance(dash.get("field"), str)):
            continue
        field, scale, sort = dash["field"], dash.get("scale") or {}, dash.get("sort")
        if isinstance(scale.get("domain"), list):
            domain = list(scale["domain"])
        elif isinstance(sort, list):
            domain = list(sort)
        else:
            domain = sorted({str(r[field]) for r in rows if r.get(field) is not None})
            if sort == "descending":
                domain.reverse()
        if term not in domain:
            continue
        dashes = scale.get("range") if isinstance(scale.get("range"), list) else DEFAULT_DASHES
        return _style(dashes[domain.index(term) % len(dashes)])
    return None


def _draws_dashes(spec: dict[str, Any]) -> bool:
    for node in _walk(spec):
        dash = node.get("strokeDash")
        if isinstance(dash, dict) and ("field" in dash or "value" in dash or "condition" in dash):
            return True
        if isinstance(dash, list) and _style(dash) != "solid":
            return True
    return False


def caption_problems(spec: dict[str, Any], caption: str) -> list[str]:
    """What in ``caption`` the chart ``spec`` does not draw, one line each (empty: the caption fits)."""
    terms = chart_terms(spec)
    problems = [
        f'"{term}" is not a label of the chart (its labels include: {", ".join(sorted(terms)[:12])}...); quote '
        "series names exactly as the chart labels them, and other quotations with “…”"
        for term in dict.fromkeys(_TERM.findall(caption))
        if " ".join(term.split()) not in terms
    ]
    dashes = _draws_dashes(spec)
    for term, said in _TERM_STYLE.findall(caption):
        drawn = series_style(spec, term) or (None if dashes else "solid")
        if drawn is None:
            problems.append(f'"{term}" is said to be {said}, but no strokeDash encoding of the chart draws it')
        elif drawn != said:
            problems.append(f'"{term}" is said to be {said}, but the chart draws it {drawn}')
    if (word := _DASH_WORD.search(caption)) and not dashes:
        problems.append(f"the caption says {word.group(1)}, but the chart draws no dashes")
    return problems
