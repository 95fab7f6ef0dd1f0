"""Round-trip latency percentiles: what one caller waits for one call.

The sync throughput rows ('single client tasks sync', '1:1 actor calls
sync') report calls per second, which is the mean latency turned over; a slow
tail hides in a mean. These rows time every call on its own (one call in
flight, `perf_counter` around `get(f.remote())`) and report one percentile of
a sample's calls, in milliseconds; the row's value is the median over samples
like every other row's.

Same constraints as workloads.py, which loads this module (WORKLOAD_MODULES):
only the standard library at module level, remote functions from that
module's helpers, and only Ray Core APIs that both runtimes share.
"""
from __future__ import annotations

import functools
import math
import time

try:
    from . import workloads as base
except ImportError:  # loaded by path next to Ray (runner._load_workloads)
    import meshray_bench_workloads as base

__all__ = ["percentile", "PERCENTILES"]

PERCENTILES = (50, 99)


def percentile(values, pct: float) -> float:
    """The nearest-rank percentile: the smallest value that at least `pct` %
    of the values are at or below.

    Nearest rank rather than interpolation, so that a reported p99 is a
    latency some call really had.
    """
    if not values:
        raise ValueError("percentile() needs at least one value, got none")
    if not 0 < pct <= 100:
        raise ValueError(f"percentile() pct must be in (0, 100], got {pct!r}")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def _round_trips(ctx: base.Context, call, pct: int, cleanup=None) -> base.Sampled:
    calls = ctx.size(2000, 50)

    def timed_calls(count: int) -> list:
        seconds = []
        for _ in range(count):
            start = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - start)
        return seconds

    def sample() -> float:
        return percentile(timed_calls(calls), pct) * 1000.0

    return base.Sampled(sample, warmup=lambda: timed_calls(ctx.size(200, 5)), cleanup=cleanup,
                        details={"calls_per_sample": calls})


def _task_round_trip(ctx: base.Context, pct: int) -> base.Sampled:
    rt = ctx.rt
    small_value, _ = base._tasks(rt)
    return _round_trips(ctx, lambda: rt.get(small_value.remote()), pct)


def _actor_round_trip(ctx: base.Context, pct: int) -> base.Sampled:
    rt = ctx.rt
    actor_cls, _, _ = base._actors(rt)
    actor = actor_cls.remote()
    rt.get(actor.small_value.remote())
    return _round_trips(ctx, lambda: rt.get(actor.small_value.remote()), pct,
                        cleanup=lambda: base._kill_actors(rt, actor))


_ROWS = (("single client task round trip", "get(f.remote())", _task_round_trip),
         ("1:1 actor call round trip", "get(actor.m.remote())", _actor_round_trip))
for _name, _call, _prepare in _ROWS:
    for _pct in PERCENTILES:
        base._workload(f"{_name} p{_pct}", "ms",
                       f"p{_pct} of 2000 {_call} calls, each timed on its own, one in flight "
                       f"(not a `ray microbenchmark` row)")(functools.partial(_prepare, pct=_pct))
