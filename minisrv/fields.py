"""How minisrv declares a setting or a sampling option once: a dataclass field with metadata.

A field's metadata holds its range, choices and help text; the dataclass validates itself from it,
the command line builds its flags from it (minisrv/cli.py), and the API schemas and the wire layout
of sampling options follow from it (minisrv/sampling_params.py). Nothing else restates a range.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Range:
    """A closed or half-open interval of numbers; None is an open end."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if isinstance(value, float) and math.isnan(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_number(self.low)}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {_number(self.high)}"
        return (f"in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}"
                f"{')' if self.high_open else ']'}")


def _number(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def check_value(name: str, value: Any, meta: dict[str, Any]) -> str | None:
    """Why `value` is not allowed for a field with metadata `meta` ("<name> must be ..."), or None."""
    allowed = meta.get("range")
    if allowed is not None and value is not None and value not in allowed:
        return f"{name} must be {allowed}, got {value!r}"
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        return f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}"
    return None


def validate_fields(obj: Any, where: Callable[[dataclasses.Field], str] = lambda f: "") -> None:
    """Raise ValueError naming the first field of dataclass `obj` whose value its metadata does not allow;
    `where(field)` adds where the value came from (a flag, say)."""
    for f in dataclasses.fields(obj):
        problem = check_value(f.name, getattr(obj, f.name), f.metadata)
        if problem is not None:
            raise ValueError(problem + where(f))
