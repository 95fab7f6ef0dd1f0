"""Settings read from the environment, checked: a bad value names the variable."""
from __future__ import annotations

import os

__all__ = ["positive_env"]


def positive_env(name: str, default, *, kind=int, expected: str = "a positive number",
                 environ=None):
    """`name`'s value as `kind` (> 0), `default` when unset; ValueError otherwise.

    `environ` is the mapping to read (default: this process's environment)."""
    raw = (os.environ if environ is None else environ).get(name)
    if raw is None:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"{name}={raw!r} must be {expected}")
    return value
