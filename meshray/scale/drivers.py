"""The real drivers `meshray scale-test` runs on its real node, and how it
reads their reports.

Each scenario that submits work runs a fresh driver process (``python -c``
with one of the programs below and a JSON config): it connects to the real
node like any Ray program, times its work, and prints one JSON line. A
process of its own keeps the driver's CPU and its ``meshray.init`` out of the
measuring process, as in Ray's release tests, whose figures these sit beside:

- ``tasks`` (many_tasks): tiny 1-CPU tasks, all submitted at once; each
  result is returned for checking.
- ``actors`` (many_actors): actors of ``actor_cpus`` CPUs (Ray's test uses
  0.2), all created at once, then each creation awaited. A hollow node
  cannot answer method calls (node/hollow.py), so readiness is the creation
  task's result, the object a Ray actor handle's owner waits on too.
- ``pgs`` (many_pgs): groups of ``bundles`` one-CPU bundles, all asked for at
  once, each waited on (``pg.wait``), then all removed.
"""
from __future__ import annotations

__all__ = ["PROGRAMS", "p99_from_buckets"]

_PREAMBLE = r"""
import json, sys, time
import meshray
cfg = json.loads(sys.argv[1])
meshray.init(address=cfg["address"])
"""

TASKS = _PREAMBLE + r"""
@meshray.remote(num_cpus=1)
def tiny(i):
    return ("real", i)

start = time.monotonic()
refs = [tiny.remote(i) for i in range(cfg["count"])]
values = meshray.get(refs, timeout=cfg["timeout"])
elapsed = time.monotonic() - start
print(json.dumps({"elapsed_s": elapsed, "values": values}))
"""

ACTORS = _PREAMBLE + r"""
@meshray.remote(num_cpus=cfg["actor_cpus"])
class Hollow:
    pass

start = time.monotonic()
actors = [Hollow.remote() for _ in range(cfg["count"])]
ready, pending = meshray.wait([actor._ready_ref for actor in actors],
                              num_returns=len(actors), timeout=cfg["timeout"])
elapsed = time.monotonic() - start
failed = 0
for ref in ready:
    try:
        meshray.get(ref, timeout=cfg["timeout"])
    except Exception:
        failed += 1
print(json.dumps({"elapsed_s": elapsed, "created": len(ready) - failed, "failed": failed,
                  "pending": len(pending)}))
"""

PGS = _PREAMBLE + r"""
from meshray.util.placement_group import placement_group, remove_placement_group

start = time.monotonic()
groups = [placement_group([{"CPU": 1.0}] * cfg["bundles"]) for _ in range(cfg["count"])]
deadline = start + cfg["timeout"]
created = sum(1 for pg in groups if pg.wait(max(0.0, deadline - time.monotonic())))
elapsed = time.monotonic() - start
for pg in groups:
    remove_placement_group(pg)
removed_s = time.monotonic() - start - elapsed
print(json.dumps({"elapsed_s": elapsed, "created": created, "removed_s": removed_s}))
"""

PROGRAMS = {"tasks": TASKS, "actors": ACTORS, "pgs": PGS}


def p99_from_buckets(buckets: dict) -> float | None:
    """The upper bound of the histogram bucket holding the 99th percentile,
    from cumulative ``{le: count}`` (Prometheus ``_bucket`` samples, ``le``
    as a float, +Inf included); None when nothing was observed. A bound, not
    an estimate inside the bucket: the buckets are fine enough to say which
    order of magnitude a decision costs."""
    if not buckets:
        return None
    ordered = sorted(buckets.items())
    total = ordered[-1][1]
    if total <= 0:
        return None
    for bound, count in ordered:
        if count >= 0.99 * total:
            return bound
    return ordered[-1][0]
