"""How a config checks itself when it is built: every problem collected with its valid range, then raised as one
:class:`LabError` (the way TransformerLens's ``HookedTransformerConfig.__post_init__`` refuses a bad config).

In a frozen dataclass's ``__post_init__``::

    checks = Problems(self)
    checks.integer("batch_size")  # an integer >= 1
    checks.number("lr", 0, open_low=True)  # finite and > 0
    checks.number("dropout", 0, 1, open_high=True)  # in [0, 1)
    checks.raise_if_any("bad pretraining config")
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from lab.errors import LabError


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class Problems:
    """What is wrong with one config, field by field, each stated with the range that would be right."""

    def __init__(self, config: object):
        self.config = config
        self.items: list[str] = []

    def add(self, message: str) -> None:
        """A problem the named checks do not cover (a relation between fields)."""
        self.items.append(message)

    def integer(self, name: str, minimum: int = 1, hint: str = "") -> bool:
        """``name`` is an integer >= ``minimum``; ``hint`` (e.g. ``"; try 8"``) follows the problem."""
        value = getattr(self.config, name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
            return True
        self.add(f"{name} must be an integer >= {minimum} (got {value!r}){hint}")
        return False

    def number(
        self,
        name: str,
        low: float,
        high: float = math.inf,
        *,
        open_low: bool = False,
        open_high: bool = False,
        hint: str = "",
    ) -> bool:
        """``name`` is a finite number in the interval from ``low`` to ``high`` (closed unless ``open_*``)."""
        value = getattr(self.config, name)
        ok = (
            _is_number(value)
            and math.isfinite(value)
            and (value > low if open_low else value >= low)
            and (value < high if open_high else value <= high)
        )
        if ok:
            return True
        if math.isinf(high):
            wanted = f"a finite number {'>' if open_low else '>='} {low:g}"
        else:
            wanted = f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        self.add(f"{name} must be {wanted} (got {value!r}){hint}")
        return False

    def choice(self, name: str, choices: Iterable[str], hint: str = "") -> bool:
        """``name`` is one of ``choices`` (listed in the message)."""
        value, choices = getattr(self.config, name), tuple(choices)
        if value in choices:
            return True
        self.add(f"{name} must be one of {', '.join(map(repr, choices))} (got {value!r}){hint}")
        return False

    def raise_if_any(self, what: str) -> None:
        """One :class:`LabError` ``"<what>: <problem>; <problem>"`` when anything was found."""
        if self.items:
            raise LabError(f"{what}: " + "; ".join(self.items))
