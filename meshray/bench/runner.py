"""Run the microbenchmark workloads on one runtime, in this process only.

    python -m meshray.bench.runner --runtime meshray --events out.jsonl
    /path/to/ray/python  meshray/bench/runner.py --runtime ray --events out.jsonl

One runner process per runtime, so meshray and Ray never share an
interpreter (both install import hooks, atexit handlers and signal handlers
that would otherwise interfere). The runner appends one JSON object per line
to --events: "meta" once, "start" before each row and "row" with the result,
so the parent can show progress, tell which row hung, and restart a runner
past it. Results never go to stdout, which workers' forwarded prints share.

This file, like workloads.py, imports only the standard library (and numpy
inside workloads), so it also runs as a plain file under an interpreter that
has Ray but not meshray's dependencies.

The methodology follows `ray microbenchmark`: a warm-up, then several timed
runs of a fixed duration each, every run one sample; the row's value is the
median of the samples (Ray reports the mean; the median is less sensitive to
one run that a noisy neighbour disturbed).
"""
from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import os
import statistics
import sys
import time
import traceback

__all__ = ["main", "measure", "classify_failure", "DEFAULTS", "QUICK"]

# (warm-up seconds, seconds per run, runs). Quick mode runs each row once,
# just to prove it works: a smoke test, not a measurement.
DEFAULTS = {"warmup": 1.0, "duration": 2.0, "runs": 5}
QUICK = {"warmup": 0.0, "duration": 0.0, "runs": 1}


def _load_workloads():
    if __package__:
        from meshray.bench import workloads
        return workloads
    # Run as a file: importing the meshray package would pull in meshray's own
    # dependencies, which the interpreter that has Ray need not have.
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workloads.py")
    spec = importlib.util.spec_from_file_location("meshray_bench_workloads", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _prepare_environment(runtime: str) -> None:
    """Switch off what would make Ray slower or chattier without being Ray's
    core work: usage-stats reporting and the container CPU-limit check. The
    dashboard is switched off through init() arguments."""
    if runtime == "ray":
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_DISABLE_DOCKER_CPU_WARNING", "1")


def classify_failure(exc: BaseException, rt) -> str:
    """'n/a' when the runtime lacks the feature, 'error' when it has it and it failed.

    A missing module, attribute or an explicit NotImplementedError means the
    feature is not there. The same exception types raised *inside* a task come
    back wrapped as the runtime's RayError subclasses; those are real failures.
    """
    ray_error = getattr(getattr(rt, "exceptions", None), "RayError", None)
    if ray_error is not None and isinstance(exc, ray_error):
        return "error"
    if isinstance(exc, (ImportError, AttributeError, NotImplementedError)):
        return "n/a"
    return "error"


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:300]


def measure(prepared, *, warmup: float, duration: float, runs: int) -> list:
    """Samples for a prepared workload (a Timed or a Sampled)."""
    if hasattr(prepared, "sample"):
        if prepared.warmup is not None:
            prepared.warmup()
        return [float(prepared.sample()) for _ in range(runs)]
    op = prepared.op
    if warmup > 0:
        end = time.perf_counter() + warmup
        op()
        while time.perf_counter() < end:
            op()
    samples = []
    for _ in range(runs):
        count = 0
        start = time.perf_counter()
        while True:
            op()
            count += 1
            elapsed = time.perf_counter() - start
            if elapsed >= duration:
                break
        if prepared.per_op_seconds:
            samples.append(elapsed / count)
        else:
            samples.append(prepared.per_call * count / elapsed)
    return samples


class _Session:
    """The shared init() session most rows run in, started on first need."""

    def __init__(self, rt, num_cpus: int):
        self.rt = rt
        self.num_cpus = num_cpus
        self.active = False
        self.error: str | None = None

    def ensure(self) -> None:
        if self.active:
            return
        if self.error is not None:
            raise RuntimeError(self.error)
        try:
            # "custom" is what the placement-group rows reserve (as in Ray's own run).
            self.rt.init(num_cpus=self.num_cpus, include_dashboard=False,
                         resources={"custom": 100})
        except Exception as exc:  # noqa: BLE001 - every session row reports it
            self.error = f"init() failed: {_describe(exc)}"
            raise RuntimeError(self.error) from exc
        self.active = True

    def close(self) -> None:
        if self.active:
            self.active = False
            self.rt.shutdown()


def _run_row(workload, ctx, session, timing: dict) -> dict:
    result = {"name": workload.name, "unit": workload.unit, "status": "ok", "value": None,
              "runs": 0, "samples": [], "error": None, "details": {}}
    runs = timing["runs"]
    if workload.max_runs is not None:
        runs = min(runs, workload.max_runs)
    started = time.perf_counter()
    prepared = None
    try:
        if workload.needs_session:
            session.ensure()
        else:
            session.close()
        prepared = workload.prepare(ctx)
        samples = measure(prepared, warmup=timing["warmup"], duration=timing["duration"],
                          runs=runs)
        if not samples or any(s != s or s <= 0 for s in samples):  # NaN or non-positive
            raise RuntimeError(f"implausible samples {samples}")
        result["samples"] = samples
        result["runs"] = len(samples)
        result["value"] = statistics.median(samples)
    except Exception as exc:  # noqa: BLE001 - one row's failure never stops the run
        result["status"] = classify_failure(exc, ctx.rt)
        result["error"] = _describe(exc)
        if result["status"] == "error":
            result["details"]["traceback"] = traceback.format_exc()[-4000:]
    finally:
        if prepared is not None:
            result["details"].update(prepared.details)
            if prepared.cleanup is not None:
                try:
                    prepared.cleanup()
                except Exception as exc:  # noqa: BLE001
                    result["details"]["cleanup_error"] = _describe(exc)
        gc.collect()
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def _emit(path: str, event: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(event) + "\n")
        handle.flush()


def _probe(runtime: str, name: str, num_cpus: int) -> int:
    """One fresh-process measurement (workloads.PROBES), printed as JSON."""
    _prepare_environment(runtime)
    start = time.perf_counter()
    rt = importlib.import_module(runtime)
    import_s = time.perf_counter() - start
    probes = _load_workloads().PROBES
    if name not in probes:
        print(f"unknown probe {name!r}; known: {sorted(probes)}", file=sys.stderr)
        return 2
    result = {"import_s": import_s, **probes[name](rt, num_cpus)}
    print(json.dumps(result), flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime", choices=("meshray", "ray"), required=True)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--events", help="append JSON-lines results here (default: stdout)")
    parser.add_argument("--row", action="append", default=[],
                        help="exact row name to run (repeatable; default: all)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int)
    parser.add_argument("--duration", type=float)
    parser.add_argument("--warmup", type=float)
    parser.add_argument("--probe", metavar="NAME", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.probe:
        return _probe(args.runtime, args.probe, args.num_cpus)

    def emit(event):
        if args.events:
            _emit(args.events, event)
        else:
            print(json.dumps(event), flush=True)

    _prepare_environment(args.runtime)
    try:
        rt = importlib.import_module(args.runtime)
        workloads = _load_workloads()
    except Exception as exc:  # noqa: BLE001
        emit({"event": "fatal", "error": f"cannot import {args.runtime} with {sys.executable}: "
                                         f"{_describe(exc)}"})
        return 2
    timing = dict(QUICK if args.quick else DEFAULTS)
    for key in ("runs", "duration", "warmup"):
        if getattr(args, key) is not None:
            timing[key] = getattr(args, key)
    emit({"event": "meta", "runtime": args.runtime, "version": getattr(rt, "__version__", "?"),
          "python": sys.version.split()[0], "executable": sys.executable,
          "num_cpus": args.num_cpus, "timing": timing})

    chosen = workloads.WORKLOADS
    if args.row:
        unknown = set(args.row) - set(workloads.ROW_NAMES)
        if unknown:
            emit({"event": "fatal", "error": f"unknown rows: {sorted(unknown)}"})
            return 2
        chosen = [w for w in workloads.WORKLOADS if w.name in args.row]
    # Rows that share the init() session first, then those that start their
    # own processes or clusters (which need the session gone).
    chosen = sorted(chosen, key=lambda w: not w.needs_session)
    ctx = workloads.Context(rt=rt, runtime=args.runtime, num_cpus=args.num_cpus,
                            quick=args.quick, runs=timing["runs"], python=sys.executable,
                            runner_path=os.path.abspath(__file__))
    session = _Session(rt, args.num_cpus)
    try:
        for workload in chosen:
            emit({"event": "start", "name": workload.name})
            emit({"event": "row", **_run_row(workload, ctx, session, timing)})
    finally:
        try:
            session.close()
        except Exception:  # noqa: BLE001 - the parent cleans up what is left
            pass
    emit({"event": "done"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
