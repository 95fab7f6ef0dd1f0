"""Draining a node before it leaves: the decisions, without I/O.

A node told to go (SIGTERM from Kubernetes, `meshray stop`) does not simply
vanish: peers would only learn it is gone when its lease expires, and the
tasks it runs would die with it. Draining instead

1. marks the node as draining in its etcd record, so peers stop offering it
   work (their placement treats it as not a candidate), refuses spills from
   peers that have not seen the mark yet, and starts nothing new locally;
2. hands work that has not started back: tasks queued here for another
   node are refused after the fact (a late SpillVerdict), so their owner
   places them again; tasks of local drivers are offered to peers;
3. waits for the tasks already running here to finish, until the deadline;
4. revokes the node's lease (peers see it gone at once, not a TTL later)
   and exits.

Actors hosted here are not waited for -- they never finish on their own --
and die at the end, as on a node death: their owners restart them elsewhere
when ``max_restarts`` allows.

The names follow Ray's DrainNode request: a ``reason`` (Ray's
DRAIN_NODE_REASON_* values), a ``reason_message`` and a
``deadline_timestamp_ms``. A second SIGTERM or SIGINT during a drain stops
the node at once. The pure parts -- the signal state machine, the drain's
progress and the timeout setting -- are here so tests exercise them with
plain values (tests/unit/test_drain.py); node/draining.py does the acting.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["DEFAULT_DRAIN_TIMEOUT_S", "DRAIN_TIMEOUT_ENV", "DRAIN_TIMEOUT_HELP", "REASON_PREEMPTION",
           "REASON_IDLE_TERMINATION", "DrainPlan", "NodeLifecycle", "drain_progress",
           "drain_timeout"]

# Below Kubernetes' default terminationGracePeriodSeconds (30 s), leaving the
# node a few seconds to revoke its lease and stop its workers.
DEFAULT_DRAIN_TIMEOUT_S = 25.0
DRAIN_TIMEOUT_ENV = "MESHRAY_DRAIN_TIMEOUT_S"
DRAIN_TIMEOUT_HELP = ("on SIGTERM/SIGINT the node drains: it takes no new work, hands queued "
                      "tasks to peers and gives running ones this many seconds (default: "
                      f"{DRAIN_TIMEOUT_ENV}, else {DEFAULT_DRAIN_TIMEOUT_S:g}); a second "
                      "signal stops it at once")
REASON_PREEMPTION = "DRAIN_NODE_REASON_PREEMPTION"
REASON_IDLE_TERMINATION = "DRAIN_NODE_REASON_IDLE_TERMINATION"


def drain_timeout(flag: float | None = None, environ=None) -> float:
    """Seconds a drain may take: the flag, else MESHRAY_DRAIN_TIMEOUT_S, else 25.

    0 means "do not wait for running tasks" (hand back, revoke, exit).
    """
    if flag is not None:
        value, source = flag, "--drain-timeout"
    else:
        env = os.environ if environ is None else environ
        text = env.get(DRAIN_TIMEOUT_ENV)
        if text is None or text == "":
            return DEFAULT_DRAIN_TIMEOUT_S
        source = DRAIN_TIMEOUT_ENV
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{DRAIN_TIMEOUT_ENV}={text!r}: expected a number of seconds "
                             ">= 0") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{source}={value!r}: expected a finite number of seconds >= 0")
    return float(value)


@dataclass(frozen=True)
class DrainPlan:
    """One drain: why, and until when (monotonic seconds; wall-clock ms as Ray)."""

    reason: str
    reason_message: str
    deadline: float
    deadline_timestamp_ms: int

    @classmethod
    def start(cls, reason: str, reason_message: str, timeout_s: float, *,
              now: float, wall_now: float) -> "DrainPlan":
        return cls(reason, reason_message, now + timeout_s,
                   int((wall_now + timeout_s) * 1000))

    def record(self) -> dict:
        """What the node's etcd record carries while it drains."""
        return {"reason": self.reason, "reason_message": self.reason_message,
                "deadline_timestamp_ms": self.deadline_timestamp_ms}


class NodeLifecycle:
    """SERVING -> DRAINING -> STOPPING, driven by stop signals.

    ``on_signal`` says what a SIGTERM/SIGINT means now: the first one starts
    a drain (``"drain"``); one during a drain stops at once (``"stop"``);
    later ones change nothing (``"ignore"``). ``drain=False`` (a node that
    must not drain, e.g. a private cluster whose driver is gone) stops at
    the first signal.
    """

    SERVING, DRAINING, STOPPING = "SERVING", "DRAINING", "STOPPING"

    def __init__(self):
        self.state = self.SERVING

    def on_signal(self, *, drain: bool = True) -> str:
        if self.state == self.SERVING and drain:
            self.state = self.DRAINING
            return "drain"
        if self.state == self.STOPPING:
            return "ignore"
        self.state = self.STOPPING
        return "stop"

    def drained(self) -> str:
        """The drain ended (idle or past its deadline): stop, unless already stopping."""
        if self.state == self.STOPPING:
            return "ignore"
        self.state = self.STOPPING
        return "stop"


def drain_progress(now: float, deadline: float, running: int, queued: int) -> tuple[bool, str]:
    """(done, why) for a drain with `running` tasks still executing here and
    `queued` not yet handed back.

    Done when nothing runs or waits here any more, or the deadline passed
    (what still runs then is lost, as on a node death, and retried by its
    owner where its retries allow).
    """
    if running < 0 or queued < 0:
        raise ValueError(f"running={running!r}, queued={queued!r}: expected counts >= 0")
    if running == 0 and queued == 0:
        return True, "idle: every task that ran here finished"
    if now >= deadline:
        return True, (f"deadline passed with {running} task(s) running and {queued} "
                      "queued here")
    return False, f"waiting for {running} running and {queued} queued task(s)"
