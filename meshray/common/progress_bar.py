"""The line a remote progress bar writes to say its state.

A bar in a task or actor (meshray.experimental.tqdm_ray) cannot draw on the
driver's terminal: it prints its state as one marked line on the worker's
stdout, which travels the usual worker-output path, and the driver's printer
(meshray.core.progress_bars) draws it instead of printing it. Both sides
must agree on the format, hence it lives here.

The line is JSON, never pickle: it comes from task code and is checked field
by field before the driver uses it.
"""
from __future__ import annotations

import json
import math

__all__ = ["BAR_MARKER", "bar_line", "parse_bar_line", "MAX_TEXT"]

# Control characters no program prints by accident start the line.
BAR_MARKER = "\x1emeshray-bar\x1f"
MAX_TEXT = 200        # longest description or unit kept
_FIELDS = {"id": str, "desc": str, "unit": str, "n": (int, float), "total": (int, float, type(None)),
           "pos": int, "elapsed": (int, float), "closed": bool}


def bar_line(state: dict) -> str:
    """The marked line (without newline) carrying `state` (the keys of _FIELDS)."""
    return BAR_MARKER + json.dumps(state, separators=(",", ":"))


def parse_bar_line(text: str) -> dict | None:
    """The bar state a marked line carries, or None when `text` is not a valid one."""
    if not text.startswith(BAR_MARKER):
        return None
    try:
        state = json.loads(text[len(BAR_MARKER):])
    except ValueError:
        return None
    if not isinstance(state, dict) or set(state) != set(_FIELDS):
        return None
    for key, kinds in _FIELDS.items():
        value = state[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and kinds is not bool):
            return None
        if isinstance(value, float) and not math.isfinite(value):
            return None
    if state["n"] < 0 or (state["total"] is not None and state["total"] < 0) \
            or state["elapsed"] < 0 or len(state["id"]) > 64:
        return None
    state["desc"] = _printable(state["desc"])
    state["unit"] = _printable(state["unit"]) or "it"
    return state


def _printable(text: str) -> str:
    """No escape sequences from task code reach the driver's terminal."""
    return "".join(ch for ch in text[:MAX_TEXT] if ch.isprintable())
