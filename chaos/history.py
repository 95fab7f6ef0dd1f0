"""The record of everything a chaos run did, as the checkers will read it.

Checkers must judge the system by what clients *observed*, not by what the
harness believes happened, so every workload operation is written down twice:
once when it is invoked and once when its outcome is known. The vocabulary is
Jepsen's, because it has proven sufficient for exactly this job:

* ``invoke`` -- the client is about to issue the operation;
* ``ok``     -- it definitely happened (and here is its result);
* ``fail``   -- it definitely did not take effect;
* ``info``   -- outcome unknown (timed out, connection lost): it may or may
  not have taken effect, and a checker must allow both.

Faults are operations of the ``nemesis`` process in the same history, so a
recovery time is a plain difference of two timestamps of one clock
(``time.monotonic()``, which Linux shares between processes: histories from
several driver processes on one machine merge without skew).
"""
from __future__ import annotations

import itertools
import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator

__all__ = ["Op", "History", "OpHandle", "NEMESIS", "load_history"]

NEMESIS = "nemesis"
_TYPES = ("invoke", "ok", "fail", "info")


@dataclass
class Op:
    """One line of the history."""
    type: str              # invoke | ok | fail | info
    process: str           # who did it: "tasks-0", "alo-1", "nemesis", "pg-driver-2"
    f: str                 # what: "fan-out", "incr", "create", "kill-node", ...
    op_id: str             # pairs an invoke with its completion
    time: float            # time.monotonic() at the event
    value: Any = None      # the argument (invoke) or the result (completion)
    error: str | None = None
    index: int = -1        # position in the merged history
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out = asdict(self)
        if not out["extra"]:
            out.pop("extra")
        return out


class OpHandle:
    """The pending half of an operation; complete it exactly once."""

    def __init__(self, history: "History", invoke: Op):
        self._history = history
        self.invoke = invoke
        self.completion: Op | None = None

    @property
    def op_id(self) -> str:
        return self.invoke.op_id

    def _complete(self, kind: str, value=None, error: BaseException | str | None = None,
                  **extra) -> Op:
        if self.completion is not None:
            raise RuntimeError(f"operation {self.op_id} completed twice "
                               f"({self.completion.type} then {kind})")
        if error is not None and not isinstance(error, str):
            error = f"{type(error).__name__}: {error}"
        self.completion = self._history.append(Op(
            kind, self.invoke.process, self.invoke.f, self.invoke.op_id, time.monotonic(),
            value, error, extra=extra))
        return self.completion

    def ok(self, value=None, **extra) -> Op:
        return self._complete("ok", value, **extra)

    def fail(self, error, value=None, **extra) -> Op:
        return self._complete("fail", value, error, **extra)

    def info(self, error, value=None, **extra) -> Op:
        return self._complete("info", value, error, **extra)


class History:
    """An append-only, thread-safe list of Ops, optionally mirrored to a file.

    The file (JSON lines) is written as the run goes, so a run that hangs or
    is killed still leaves the evidence of what happened up to that point.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, start: float | None = None):
        self._ops: list[Op] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.start = time.monotonic() if start is None else start
        self.path = os.fspath(path) if path else None
        self._file = open(self.path, "a", buffering=1) if self.path else None

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    def append(self, op: Op) -> Op:
        if op.type not in _TYPES:
            raise ValueError(f"op type must be one of {_TYPES}, got {op.type!r}")
        with self._lock:
            op.index = len(self._ops)
            self._ops.append(op)
            if self._file is not None:
                self._file.write(json.dumps(op.to_json(), default=repr) + "\n")
        return op

    def invoke(self, process: str, f: str, value=None, *, op_id: str | None = None,
               **extra) -> OpHandle:
        op = Op("invoke", process, f, op_id or self.new_id(f), time.monotonic(), value,
                extra=extra)
        return OpHandle(self, self.append(op))

    def extend(self, ops: Iterable[Op]) -> None:
        """Merge operations recorded elsewhere (another driver process)."""
        for op in ops:
            self.append(Op(op.type, op.process, op.f, op.op_id, op.time, op.value, op.error,
                           extra=dict(op.extra)))

    def ops(self) -> list[Op]:
        with self._lock:
            return sorted(self._ops, key=lambda op: (op.time, op.index))

    def __iter__(self) -> Iterator[Op]:
        return iter(self.ops())

    def __len__(self) -> int:
        with self._lock:
            return len(self._ops)

    def pairs(self, *, process_prefix: str | None = None, f: str | None = None
              ) -> list[tuple[Op, Op | None]]:
        """(invoke, completion-or-None) for every invoked operation."""
        done: dict[str, Op] = {}
        invokes: list[Op] = []
        for op in self.ops():
            if process_prefix is not None and not op.process.startswith(process_prefix):
                continue
            if f is not None and op.f != f:
                continue
            if op.type == "invoke":
                invokes.append(op)
            else:
                done[op.op_id] = op
        return [(op, done.get(op.op_id)) for op in invokes]

    def relative(self, t: float) -> float:
        """Seconds since the run started (what reports print)."""
        return round(t - self.start, 3)


def load_history(path: str | os.PathLike) -> History:
    """Read a JSON-lines history written by History(path=...)."""
    history = History()
    with open(path) as handle:
        ops = [Op(**json.loads(line)) for line in handle if line.strip()]
    if ops:
        history.start = min(op.time for op in ops)
    for op in sorted(ops, key=lambda o: o.index):
        history.append(op)
    return history
