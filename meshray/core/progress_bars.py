"""The driver's printer of worker output, which draws remote progress bars.

Worker lines arrive in batches (CoreWorker._on_logs); a line that carries a
bar's state (common/progress_bar.py) updates that bar instead of being
printed. On a terminal the open bars are drawn as a block below everything
else, one line each: before any other line is printed the block is erased
and afterwards drawn again, so output and bars never mix on one line. When
stdout is not a terminal (a pipe, a file, a CI log) redrawing would only
leave a trail of states, so a bar is printed once, in its final state, when
it closes.
"""
from __future__ import annotations

import sys
import threading

from meshray.common.progress_bar import parse_bar_line

__all__ = ["BarPrinter", "PRINTER", "format_bar"]

BAR_WIDTH = 25


def _number(value) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.2f}"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def format_bar(prefix: str, state: dict) -> str:
    """One bar as one line of text, tqdm-like."""
    n, total, unit = state["n"], state["total"], state["unit"]
    head = f"{prefix} " if prefix else ""
    head += f"{state['desc']}: " if state["desc"] else ""
    elapsed = state["elapsed"]
    rate = f"{n / elapsed:.2f}{unit}/s" if elapsed > 0 else f"?{unit}/s"
    if total:
        done = min(1.0, n / total)
        filled = int(done * BAR_WIDTH)
        bar = "█" * filled + " " * (BAR_WIDTH - filled)
        return (f"{head}{done * 100:3.0f}%|{bar}| {_number(n)}/{_number(total)} "
                f"[{_clock(elapsed)}, {rate}]")
    return f"{head}{_number(n)}{unit} [{_clock(elapsed)}, {rate}]"


class BarPrinter:
    """Prints worker lines and draws bars; thread-safe (the core worker's
    reader thread and the driver's own bars both use it)."""

    def __init__(self):
        self._lock = threading.RLock()
        self._open: dict[tuple, tuple] = {}     # (prefix, bar id) -> (prefix, state)
        self._drawn = 0                         # bar lines now on the terminal
        self.finished = 0                       # bars printed in their final state

    @staticmethod
    def _interactive() -> bool:
        isatty = getattr(sys.stdout, "isatty", None)
        try:
            return bool(isatty and isatty())
        except ValueError:                      # closed
            return False

    def show_logs(self, lines) -> None:
        """A batch of pb.LogLine from workers: bar states drawn, the rest printed."""
        for line in lines:
            state = None if line.is_err else parse_bar_line(line.text)
            if state is not None:
                self.update(line.prefix, state)
            else:
                self.print_line(f"{line.prefix} {line.text}", sys.stderr if line.is_err else sys.stdout)

    def print_line(self, text: str, stream=None) -> None:
        """Print `text` above the bars (safe to call from any thread)."""
        stream = stream or sys.stdout
        with self._lock:
            live = self._interactive() and self._drawn
            if live:
                self._erase()
            _write_line(stream, text, flush=True)
            if live:
                self._draw()

    def update(self, prefix: str, state: dict) -> None:
        """A bar's new state; a closed bar leaves the block, printed for good."""
        key = (prefix, state["id"])
        with self._lock:
            interactive = self._interactive()
            if interactive:
                self._erase()
            if state["closed"]:
                self._open.pop(key, None)
                _write_line(sys.stdout, format_bar(prefix, state), flush=not interactive)
                self.finished += 1
            else:
                self._open[key] = (prefix, state)
            if interactive:
                self._draw()

    def _erase(self) -> None:
        if self._drawn:
            # Up to the first bar line, then erase to the end of the screen.
            sys.stdout.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _draw(self) -> None:
        bars = sorted(self._open.values(), key=lambda item: item[1]["pos"])
        for prefix, state in bars:
            sys.stdout.write(format_bar(prefix, state) + "\n")
        self._drawn = len(bars)
        sys.stdout.flush()


def _write_line(stream, text: str, *, flush: bool) -> None:
    """One write for the text and its newline: `print` writes them separately,
    so a line printed by the driver's own thread could land between them."""
    stream.write(text + "\n")
    if flush:
        stream.flush()


PRINTER = BarPrinter()
