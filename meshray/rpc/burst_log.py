"""A log line per refused call, without letting a flood of them flood the log.

Every refusal is worth knowing about (a misconfigured peer, a buggy one, or
someone probing), but a loop can send thousands a second: after `burst`
lines in a window the rest are counted and reported as one line when the
next window opens. Both refusals the servers make -- a call without a valid
membership proof (gate.py) and a malformed request (strict.py) -- use it.
"""
from __future__ import annotations

import logging
import threading
import time

__all__ = ["BurstLog"]


class BurstLog:
    def __init__(self, logger: logging.Logger, line: str, summary: str, *,
                 burst: int = 20, window_s: float = 10.0):
        """`line` formats (method, peer, reason); `summary` formats (count, window_s)."""
        self._log, self._line, self._summary = logger, line, summary
        self._burst, self._window = burst, window_s
        self._lock = threading.Lock()
        self._window_start = 0.0
        self._logged = 0
        self._suppressed = 0

    def record(self, method: str, peer: str, reason: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._window_start >= self._window:
                if self._suppressed:
                    self._log.warning(self._summary, self._suppressed, self._window)
                self._window_start, self._logged, self._suppressed = now, 0, 0
            if self._logged >= self._burst:
                self._suppressed += 1
                return
            self._logged += 1
        self._log.warning(self._line, method, peer, reason)
