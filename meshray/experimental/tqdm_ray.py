"""Progress bars for tasks and actors, drawn in the driver's terminal (Ray's `tqdm_ray`).

A bar made in a task or actor prints its state as one marked line on the
worker's stdout (common/progress_bar.py), at most every `flush_interval_s`
and once more when it closes; the line travels with the rest of the worker's
output and the driver draws it (core/progress_bars.py), one line per bar,
never mixed with printed output. A bar made in the driver itself is drawn by
the same printer directly. Only what tqdm's common use needs is here:
iteration, `update`, `set_description`, `refresh`, `close`, `with`.
"""
from __future__ import annotations

import builtins
import numbers
import sys
import time
import uuid

from meshray.common.progress_bar import bar_line
from meshray.core import progress_bars
from meshray.core.state import state as _process

__all__ = ["tqdm", "safe_print"]

DEFAULT_FLUSH_INTERVAL_S = 1.0


def _check(name: str, value, ok: bool, expected: str) -> None:
    if ok:
        return
    wrong_value = isinstance(value, numbers.Real) and not isinstance(value, bool)
    raise (ValueError if wrong_value else TypeError)(
        f"tqdm_ray.tqdm({name}={value!r}): expected {expected}")


def _is_count(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value >= 0


class tqdm:  # noqa: N801 - Ray's (and tqdm's) name
    """A progress bar: `tqdm(iterable)` to wrap a loop, or `tqdm(total=N)` and `update()`."""

    def __init__(self, iterable=None, desc: str | None = None, total=None, unit: str | None = None,
                 position: int | None = None, flush_interval_s: float | None = None):
        _check("desc", desc, desc is None or isinstance(desc, str), "a str or None")
        _check("unit", unit, unit is None or isinstance(unit, str), "a str or None")
        _check("total", total, total is None or _is_count(total), "a number >= 0 or None")
        _check("position", position, position is None or (
            isinstance(position, int) and not isinstance(position, bool) and position >= 0),
            "an int >= 0 or None")
        _check("flush_interval_s", flush_interval_s, flush_interval_s is None or (
            _is_count(flush_interval_s) and flush_interval_s > 0), "a number > 0 or None")
        if total is None and iterable is not None:
            try:
                total = len(iterable)
            except (TypeError, AttributeError):
                total = None
        self.iterable = iterable
        self.desc = desc or ""
        self.total = total
        self.unit = unit or "it"
        self.pos = position or 0
        self.n = 0
        self._id = uuid.uuid4().hex
        self._flush_interval = flush_interval_s or DEFAULT_FLUSH_INTERVAL_S
        self._started = time.monotonic()
        self._last_flush = float("-inf")
        self._closed = False
        self._flush()

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        _check("desc", desc, desc is None or isinstance(desc, str), "a str or None")
        self.desc = desc or ""
        if refresh:
            self.refresh()

    def update(self, n=1) -> None:
        """Count `n` more done; the driver hears of it within the flush interval."""
        _check("n", n, isinstance(n, numbers.Real) and not isinstance(n, bool), "a number")
        self.n += n
        if time.monotonic() - self._last_flush >= self._flush_interval:
            self._flush()

    def refresh(self) -> None:
        """Send the current state now."""
        self._flush()

    def close(self) -> None:
        """Send the final state; the driver prints the bar for good."""
        if not self._closed:
            self._closed = True
            self._flush()

    def __iter__(self):
        if self.iterable is None:
            raise TypeError("tqdm_ray.tqdm(iterable=None) cannot be iterated: pass an iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "tqdm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _state(self) -> dict:
        return {"id": self._id, "desc": self.desc, "unit": self.unit, "n": self.n,
                "total": self.total, "pos": self.pos, "closed": self._closed,
                "elapsed": time.monotonic() - self._started}

    def _flush(self) -> None:
        self._last_flush = time.monotonic()
        if _process.mode == "worker":
            print(bar_line(self._state()), file=sys.stdout, flush=True)
        else:
            progress_bars.PRINTER.update("", self._state())


def safe_print(*args, **kwargs) -> None:
    """print() that keeps the driver's bars intact (same arguments as print)."""
    stream = kwargs.pop("file", None) or sys.stdout
    if _process.mode == "worker":
        builtins.print(*args, file=stream, **kwargs)
        return
    sep, end = kwargs.pop("sep", " "), kwargs.pop("end", "\n")
    text = sep.join(str(arg) for arg in args) + end
    progress_bars.PRINTER.print_line(text[:-1] if text.endswith("\n") else text, stream)
