"""Checks of plain arguments (numbers, choices, flags), shared by every layer of ral: the op, the
integrations and the trainers raise the same errors with the same wording (docs/design.md, "Bad input").

Each check returns nothing and raises naming the argument: ``TypeError`` for a value of the wrong
kind where Python would (a flag that is not a bool, a choice that is not a str), ``ValueError``
otherwise. bool is never accepted as a number.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["check_int", "check_float", "check_choice", "check_flag"]

_BOUNDS = {">= 0": lambda v: v >= 0, "> 0": lambda v: v > 0, "": lambda v: True}


def check_int(name: str, value, least: int) -> None:
    """ValueError unless ``value`` is an integer (Python or NumPy, not a bool) >= ``least``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")


def check_float(name: str, value, bound: str = "") -> None:
    """ValueError unless ``value`` is a finite real number (an int counts, a bool does not) meeting
    ``bound``: ">= 0", "> 0" or "" (any finite value)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or not _BOUNDS[bound](value):
        raise ValueError(f"{name} must be a finite float {bound}".rstrip() + f", got {value!r}")


def check_choice(name: str, value, choices) -> None:
    """TypeError unless ``value`` is a str; ValueError unless it is one of ``choices``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {tuple(choices)}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_flag(name: str, value) -> None:
    """TypeError unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
