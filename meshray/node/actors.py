"""Actors hosted on this node: their lifecycle and their etcd records.

State machine (one record per actor, mirrored to etcd on every change):

    PENDING --created--> ALIVE --worker died, restarts left--> RESTARTING --> ALIVE
       |                   |                                        |
       +--init failed------+--killed / exited / owner died / no restarts left--> DEAD

`transition()` is pure: it takes the record and an event and returns the new
state; `apply()` is the only writer of an entry's state (it checks the move
against ACTOR_TRANSITIONS and keeps the entry's story, so an illegal move
raises with what led there); the daemon carries out what follows (restart
the creation task, free resources, publish the record, wake waiters).
Whether a restart is left is decided in one place, `restarts_left()`.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from dataclasses import dataclass, field

from meshray.common.state_names import StateName

__all__ = ["ActorEntry", "ActorState", "ACTOR_TRANSITIONS", "InvalidActorTransition", "apply",
           "restarts_left", "transition", "PENDING", "ALIVE", "RESTARTING", "DEAD"]

log = logging.getLogger(__name__)


class ActorState(StateName):
    """Values are the state names callers and etcd records carry."""
    PENDING = "PENDING"
    ALIVE = "ALIVE"
    RESTARTING = "RESTARTING"
    DEAD = "DEAD"


PENDING, ALIVE, RESTARTING, DEAD = (ActorState.PENDING, ActorState.ALIVE,
                                    ActorState.RESTARTING, ActorState.DEAD)
ACTOR_TRANSITIONS = {
    PENDING: frozenset({ALIVE, RESTARTING, DEAD}),   # RESTARTING: its first worker died
    ALIVE: frozenset({ALIVE, RESTARTING, DEAD}),     # ALIVE again: a re-announced address
    RESTARTING: frozenset({ALIVE, RESTARTING, DEAD}),
    DEAD: frozenset({DEAD}),                         # death is final; later events are no-ops
}


@dataclass(eq=False)
class ActorEntry:
    actor_id: bytes
    spec: object                        # creation TaskSpec (re-run on restart)
    owner: object                       # Connection of the creating process
    options: dict
    state: ActorState = PENDING        # written only by apply()
    story: deque = field(default_factory=lambda: deque(maxlen=16))
    address: str = ""
    num_restarts: int = 0
    death_cause: str = ""
    worker: object = None
    pid: int = 0
    no_restart: bool = False            # set by kill(no_restart=True)
    exiting: bool = False               # exit_actor() / __ray_terminate__
    waiters: list = field(default_factory=list)   # futures woken on state change
    killed: bool = False                # the worker was killed on purpose
    kill_cause: str = ""
    holding: bool = False               # its held resources are taken from the node
    allocation: object = None           # device assignment it holds (GPUs)
    bundle_task: object = None          # creation TaskRecord when it lives in a PG bundle
    owner_node: str = ""                # set when the actor was created for another node
    remote_node: str = ""               # set on the creating node when it runs elsewhere

    @classmethod
    def from_spec(cls, spec, owner) -> "ActorEntry":
        """The one way a node makes an actor entry: from its creation task's spec."""
        return cls(spec.actor_id, spec, owner, json.loads(spec.actor_options or b"{}"))

    @property
    def hold(self):
        from meshray.scheduler.resources import ResourceSet
        return ResourceSet.from_dict(dict(self.spec.held_resources))


    @property
    def max_restarts(self) -> int:
        return int(self.options.get("max_restarts", 0))

    @property
    def detached(self) -> bool:
        return self.options.get("lifetime") == "detached"

    def record(self, node_id_hex: str) -> dict:
        """The JSON-able record callers and etcd see."""
        return {
            "actor_id": self.actor_id.hex(),
            "state": self.state,
            "node_id": self.remote_node or node_id_hex,
            "address": self.address,
            "num_restarts": self.num_restarts,
            "death_cause": self.death_cause,
            "name": self.options.get("name") or "",
            "namespace": self.options.get("namespace") or "",
            "class_name": self.options.get("class_name", ""),
            "methods": self.options.get("methods", {}),
            "is_async": bool(self.options.get("is_async")),
            "max_task_retries": int(self.options.get("max_task_retries", 0)),
            "max_restarts": self.max_restarts,
            "detached": self.detached,
            "owner_id": self.spec.owner_id.hex(),
            "job_id": self.spec.job_id.hex(),
            "pid": self.pid,
        }

    def encode(self, node_id_hex: str) -> bytes:
        return json.dumps(self.record(node_id_hex)).encode()

    def wake(self) -> None:
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.waiters.clear()

    def settled(self) -> bool:
        """DEAD, or ALIVE in an incarnation whose worker still runs: an answer to act on.

        A caller whose stream broke asks until this holds. A worker that died
        but whose death this node has not processed yet is not settled, so the
        caller is not sent back to the address that just failed.
        """
        if self.state == DEAD:
            return True
        if self.state != ALIVE or self.killed or self.exiting:
            return False            # a kill or exit is under way: wait for its outcome
        worker = self.worker
        return worker is None or worker.process.poll() is None

    async def wait_settled(self, timeout: float) -> None:
        """Wait until settled() holds or the timeout passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.settled():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            waiter = loop.create_future()
            self.waiters.append(waiter)
            try:
                # Bounded, so a worker death seen only by poll() is noticed.
                await asyncio.wait_for(waiter, min(remaining, 0.2))
            except asyncio.TimeoutError:
                continue


class InvalidActorTransition(RuntimeError):
    def __init__(self, entry: ActorEntry, new, event: str):
        story = "\n".join(f"  {old} -> {to}: {why}" for old, to, why in entry.story) or "  (none)"
        super().__init__(f"actor {entry.actor_id.hex()} cannot move from {entry.state} to {new} "
                         f"on {event!r}. Its last moves:\n{story}")
        self.actor_id = entry.actor_id


def restarts_left(entry: ActorEntry) -> bool:
    """May `entry` be restarted once more (max_restarts=-1: without limit)?"""
    return entry.max_restarts == -1 or entry.num_restarts < entry.max_restarts


def apply(entry: ActorEntry, event: str, detail: str = "", log=None) -> ActorState:
    """Move `entry` to its state after `event` -- the only writer of it
    (recorded in the node's event `log` too, when given)."""
    new = transition(entry, event, detail)
    if new not in ACTOR_TRANSITIONS[entry.state]:
        raise InvalidActorTransition(entry, new, event)
    cause = f"{event}: {detail}" if detail else event
    entry.story.append((entry.state, new, cause))
    if log is not None:
        log.record("actor", entry.actor_id, entry.state, new, cause)
    entry.state = new
    return new


def transition(entry: ActorEntry, event: str, detail: str = "") -> ActorState:
    """Next state of `entry` after `event`; also records the death cause.

    Events: "created", "init_failed", "worker_died", "killed", "owner_died",
    "node_died" (the node hosting it for us died).
    """
    if entry.state == DEAD:
        return DEAD
    if event == "created":
        return ALIVE
    if event == "init_failed":
        entry.death_cause = detail or "the actor's __init__ raised"
        return DEAD
    if event == "owner_died":
        entry.death_cause = detail or "the actor's owner died"
        return DEAD
    if event in ("worker_died", "killed", "node_died"):
        if entry.exiting:
            entry.death_cause = detail or "the actor exited on purpose"
            return DEAD
        if event == "killed" and entry.no_restart:
            entry.death_cause = detail or "the actor was killed with meshray.kill()"
            return DEAD
        if restarts_left(entry):
            return RESTARTING
        if event == "node_died":
            entry.death_cause = detail or "the node hosting the actor died"
            return DEAD
        entry.death_cause = detail or (
            f"the actor's worker process died and max_restarts={entry.max_restarts} "
            "restarts are used up")
        return DEAD
    raise ValueError(f"unknown actor event {event!r}")
