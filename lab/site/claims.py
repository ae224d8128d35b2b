"""Headline claims: a sentence that states a measured value with its comparison, checked against the data at build
time.

``{{ claim(ref, column, op, target, ...) }}`` reads one value the way ``value()`` does (``row``, ``where``, ``sort``,
``data``), compares it with ``target`` and renders the sentence's numbers; when the committed data contradicts the
statement the build fails, naming the page, the claim and the value. Comparisons (``op``):

- ``"<"``, ``"<="``, ``">"``, ``">="``, ``"=="``, ``"!="`` (``==`` and ``!=`` also compare text);
- ``"~"``: within ``tol`` of ``target`` (absolute) or within ``rel`` of it (relative: ``rel=0.1`` is "within 10 %");
- ``"between"``: ``target`` is ``[low, high]``, both included.

With ``every=True`` the comparison is made on every row ``where`` selects ("3 of 3 seeds"): it holds when all of
them satisfy it (or at least ``at_least`` of them). With ``against="<column>"`` (and ``target=None``) each row is
compared with its own value of another column ("the bytes captured equal the estimate at every length").

``says`` is the text rendered, a :meth:`str.format` template with ``{value}`` (the measured value), ``{target}``,
``{op}`` (as a sign: ≤, ≥, ≠, ±), ``{tol}``, ``{rel}``, ``{low}``, ``{high}``, ``{count}`` and ``{total}`` (with
``every``), and ``{unit}``. Numbers take a format spec after a colon (``{value:.4f}``, ``{target:.0%}``, ``{value:min}``
for seconds as minutes); without one, ``value`` uses ``fmt`` and the others the site's meaningful digits. The
default is ``"{value} {unit}"`` (``"{count} of {total}"`` with ``every``).

A claim is a statement about the profile's own run: it is checked when the result's provenance records the profile
the reference names (``cpu`` for ``"track/name"``). Results of another profile (the tests build the site on the
``smoke`` profile's tiny runs) cannot contradict it; there the numbers render marked *unchecked*.
"""

from __future__ import annotations

import html
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lab.errors import LabError
from lab.site import sources
from lab.site.formatting import format_cell

_COMPARE: dict[str, tuple[str, Callable[[Any, Any], bool]]] = {
    "<": ("<", operator.lt),
    "<=": ("≤", operator.le),
    ">": (">", operator.gt),
    ">=": ("≥", operator.ge),
    "==": ("=", operator.eq),
    "!=": ("≠", operator.ne),
}
OPS = (*_COMPARE, "~", "between")


class _Shown:
    """A value that formats as the site writes it (``{x}``), or with a spec (``{x:.3f}``, ``{x:min}``)."""

    def __init__(self, value: Any, fmt: str | None = None) -> None:
        self.value, self.fmt = value, fmt

    def __format__(self, spec: str) -> str:
        return format_cell(self.value, spec or self.fmt)


@dataclass(frozen=True)
class Claim:
    """A stated comparison of one result column with a target."""

    ref: str
    column: str
    op: str
    target: Any
    tol: float | None = None
    rel: float | None = None

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise LabError(f"{self}: comparison {self.op!r} is not one of {', '.join(OPS)}")
        if self.op == "~" and (self.tol is None) == (self.rel is None):
            raise LabError(f"{self}: '~' needs exactly one of tol= (absolute) or rel= (relative)")
        if self.op == "between" and not (isinstance(self.target, Sequence) and len(self.target) == 2):
            raise LabError(f"{self}: 'between' needs target=[low, high]")
        if self.against is not None and (self.target is not None or self.op in ("~", "between")):
            raise LabError(f"{self}: against= compares with another column: give target=None and a plain comparison")

    against: str | None = None

    def __str__(self) -> str:
        extra = f", tol={self.tol!r}" if self.tol is not None else f", rel={self.rel!r}" if self.rel is not None else ""
        extra += f", against={self.against!r}" if self.against else ""
        return f"claim({self.ref!r}, {self.column!r}, {self.op!r}, {self.target!r}{extra})"

    def stated(self) -> str:
        """The statement in words, e.g. ``≤ 0.02`` or ``within 10 % of 1.88``."""
        if self.against is not None:
            return f"{_COMPARE[self.op][0]} {self.against}"
        if self.op == "~":
            spread = f"± {format_cell(self.tol)}" if self.tol is not None else f"{format_cell(self.rel, '.0%')}"
            return f"within {spread} of {format_cell(self.target)}"
        if self.op == "between":
            return f"between {format_cell(self.target[0])} and {format_cell(self.target[1])}"
        return f"{_COMPARE[self.op][0]} {format_cell(self.target)}"

    def holds(self, value: Any, target: Any = None) -> bool:
        """Whether ``value`` satisfies the statement (``target``: the row's ``against`` value)."""
        target = self.target if self.against is None else target
        try:
            if self.against is not None:
                return bool(_COMPARE[self.op][1](value, target))
            if self.op == "~":
                allowed = self.tol if self.tol is not None else abs(self.target) * self.rel
                return abs(value - self.target) <= allowed
            if self.op == "between":
                return self.target[0] <= value <= self.target[1]
            return bool(_COMPARE[self.op][1](value, self.target))
        except TypeError as e:
            raise LabError(f"{self}: cannot compare {value!r} with {self.target!r} ({e})") from e


def is_checked(ref: str) -> bool:
    """Whether the result behind ``ref`` comes from the profile the reference names (so a claim on it is checked)."""
    profile, _track, _name = sources.result_ref(ref)
    return sources.read_provenance(ref).get("profile") == profile


def claim(
    ref: str,
    column: str,
    op: str,
    target: Any,
    unit: str = "",
    fmt: str | None = None,
    *,
    row: int = -1,
    where: Mapping[str, Any] | None = None,
    sort: str | Sequence[str] | None = None,
    data: str = "parquet",
    every: bool = False,
    at_least: int | None = None,
    tol: float | None = None,
    rel: float | None = None,
    against: str | None = None,
    says: str | None = None,
) -> str:
    """Render a checked headline (see the module docstring); :class:`LabError` when the data contradicts it."""
    stated = Claim(ref, column, op, target, tol=tol, rel=rel, against=against)
    where_text = f" where {dict(where)}" if where else ""
    fields: dict[str, Any] = {"unit": unit, "op": "±" if op == "~" else _COMPARE.get(op, ("",))[0]}
    fields |= {"tol": _Shown(tol), "rel": _Shown(rel, ".0%")}
    if op == "between":
        fields |= {"low": _Shown(target[0]), "high": _Shown(target[1]), "target": stated.stated()}
    else:
        fields["target"] = _Shown(target)
    if every:
        rows = sources.select(ref, [column, *([against] if against else [])], where=where, sort=sort, data=data)
        values = rows[column].to_list()
        targets = rows[against].to_list() if against else [target] * len(values)
        if not values:
            raise LabError(f"{stated}: no rows{where_text}")
        passing = sum(v is not None and stated.holds(v, t) for v, t in zip(values, targets, strict=True))
        needed = len(values) if at_least is None else at_least
        ok = passing >= needed
        fields |= {"count": passing, "total": len(values), "value": _Shown(values[0], fmt)}
        found = f"{passing} of {len(values)} rows{where_text} have {column} {stated.stated()} (values: "
        found += ", ".join(format_cell(v) for v in values) + f"), {needed} needed"
        template = says if says is not None else "{count} of {total}"
    else:
        value = sources.cell(ref, column, row=row, where=where, sort=sort, data=data)
        other = sources.cell(ref, against, row=row, where=where, sort=sort, data=data) if against else None
        if against:
            fields["target"] = _Shown(other)
        ok = stated.holds(value, other)
        fields["value"] = _Shown(value, fmt)
        found = f"{column} = {value!r}{where_text} (shown as {format_cell(value, fmt)}), stated {stated.stated()}"
        template = says if says is not None else ("{value} {unit}" if unit else "{value}")
    try:
        text = template.format(**fields)
    except (KeyError, IndexError, ValueError) as e:
        raise LabError(f"{stated}: says={template!r} cannot be filled ({type(e).__name__}: {e})") from e
    checked = is_checked(ref)
    if not ok and checked:
        path = sources.site_path(ref, ".parquet" if data == "parquet" else ".vl.json")
        raise LabError(f"{stated} does not hold: {found} in {path}")
    if checked:
        title, css = f"Checked when the site was built: {found}", "lab-claim"
    else:
        profile = sources.read_provenance(ref).get("profile")
        verdict = "holds" if ok else "does not hold"
        title, css = (
            f"Not checked: these are {profile} results ({verdict} here: {found})",
            "lab-claim lab-claim--unchecked",
        )
    return f'<span class="{css}" title="{html.escape(title)}">{html.escape(text, quote=False)}</span>'
