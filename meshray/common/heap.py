"""Keep the garbage collector off what a long-running process built at startup.

A node daemon or worker imports a few hundred modules and builds its tables
before it serves anything; those objects live until the process ends. CPython's
full collections walk every tracked object, so each one re-scans all of them
while the process serves tasks, and the time grows with what it imported, not
with what it does. ``gc.freeze()`` moves everything tracked so far into a
permanent generation the collector skips: the collections that follow only
look at what the process allocated while serving.

Why not ``gc.disable()``: reference cycles made while serving (tracebacks,
futures) would never be freed. Why not tuning thresholds instead: it changes
how often the collector runs, not how much each full pass walks. Freezing
without a collection first keeps whatever garbage startup left — a bounded
one-time cost — and costs no pause.
"""
from __future__ import annotations

import gc

__all__ = ["settle_heap"]


def settle_heap() -> None:
    """Call once, when the process has finished starting and begins to serve."""
    gc.freeze()
