"""Checks on the numbers the public API takes, run in the caller.

A bad number must fail where it was written, with the argument, the value
and what was expected -- not later inside a daemon or a wait loop, where
`nan` compares false with everything and slips through `< 0` checks, and
`inf` overflows the first timeout handed to the OS.

Wrong types raise InvalidOptionTypeError (a ValueError and a TypeError, as
for task options); wrong values raise ValueError.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Optional

from meshray.core.options import InvalidOptionTypeError, _quantity_problem

__all__ = ["check_timeout", "check_quantity", "check_byte_count", "check_resources"]


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_timeout(where: str, value: Any) -> Optional[float]:
    """A timeout in seconds: None or +inf wait forever; nan and negatives are errors."""
    if value is None:
        return None
    if not _is_real(value):
        raise InvalidOptionTypeError(
            f"{where} argument timeout={value!r} must be a number of seconds or None, got "
            f"{type(value).__name__}")
    seconds = float(value)
    if math.isnan(seconds) or seconds < 0:
        raise ValueError(f"{where} argument timeout={value!r} must be a number >= 0 or None "
                         f"(None or inf waits forever)")
    return None if math.isinf(seconds) else seconds


def check_quantity(where: str, name: str, value: Any) -> None:
    """A resource amount such as num_cpus: None, or a finite number >= 0."""
    if value is None:
        return
    if not _is_real(value):
        raise InvalidOptionTypeError(
            f"{where} argument {name}={value!r} must be a number, got {type(value).__name__}")
    if not math.isfinite(float(value)) or value < 0:
        raise ValueError(f"{where} argument {name}={value!r} must be a finite number >= 0")


def check_byte_count(where: str, name: str, value: Any) -> Optional[int]:
    """A size in bytes: None, or a positive whole number (2e9 is fine); returned as int."""
    if value is None:
        return None
    if not _is_real(value):
        raise InvalidOptionTypeError(
            f"{where} argument {name}={value!r} must be an int (bytes), got "
            f"{type(value).__name__}")
    if not math.isfinite(float(value)) or value <= 0 or int(value) != value:
        raise ValueError(f"{where} argument {name}={value!r} must be a positive whole number "
                         f"of bytes")
    return int(value)


def check_resources(where: str, value: Any) -> None:
    """Custom resources: a dict of non-empty names to finite amounts >= 0."""
    if value is None:
        return
    if not isinstance(value, Mapping):
        raise InvalidOptionTypeError(
            f"{where} argument resources={value!r} must be a dict of resource name to amount, "
            f"got {type(value).__name__}")
    for key in ("CPU", "GPU"):
        if key in value:
            raise ValueError(f"{where}: use the 'num_{key.lower()}s' argument instead of "
                             f"resources={{'{key}': ...}}")
    for name, amount in value.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where} argument resources={value!r}: resource names must be "
                             f"non-empty strings, got {name!r}")
        problem = _quantity_problem(f"resources[{name!r}]", amount)
        if problem:
            raise ValueError(f"{where} argument resources={value!r}: {problem}")
