"""The life of an actor on this node, as part of the node's state machine.

Why: an actor created or hosted here meets its creation task's result, its
worker's death, its host node's death, ``meshray.kill``, its owner leaving
(a local process, or the node that asked us to host it), its placement group
going away, its own ``exit_actor``, and this node losing its lease -- in any
order, and often while its creation task is still queued or running. What
each means -- does it live, restart, or die, what it gives back, who is told
-- is decided here, so every case is a unit test that feeds an event and
compares instructions (``tests/unit/test_node_state.py``), as for tasks.

The actor's states and the rule for each move are the pure table of
``node/actors.py`` (`transition`, `restarts_left`); :func:`actors.apply` is
the one writer of an entry's state, called only from here. This module
decides which move an event calls for and what follows it; the node's
``ActorHosting`` carries out what it returns: publish the record to etcd,
wake callers waiting on the actor, free its name, place a new creation task,
ask a peer to kill the actor it hosts.

It is part of :class:`~meshray.node.state.NodeState`, not a machine of its
own, because an actor's life and its creation task's are one story: a failed
``__init__`` finishes the task, a killed actor whose creation is still queued
cancels that task, a restart is a new task, and the resources an actor keeps
are the ones its creation task took. Splitting them would make the two
machines call each other.

Alternatives considered: leaving these decisions in ``ActorHosting`` beside
the etcd writes (what this replaced: each was testable only with a daemon);
one event per actor *state* instead of per fact learned (the same fact --
"the worker died" -- means restart or death depending on what the actor was
doing, which is exactly the decision to keep in one place).

Safety rests on: each handler runs to its end before any instruction is
carried out, and `apply` raising on an illegal move before anything else
changes.
"""
from __future__ import annotations

from meshray.node import actors as table
from meshray.node.state import messages as m
from meshray.node.task_lifecycle import TaskState

__all__ = ["ActorLife"]

DEAD, RESTARTING = table.DEAD, table.RESTARTING


class ActorLife:
    """The actor part of a `NodeState` (`state`): the node's actor table
    (`state.actors`, id -> ``ActorEntry``), and the task machine for the
    creation tasks (release, adopt, cancel)."""

    def __init__(self, state):
        self._state = state

    def handlers(self) -> dict:
        return {
            m.ActorCreated: self._created,
            m.ActorCreatedElsewhere: self._created_elsewhere,
            m.ActorHostDied: self._host_died,
            m.ActorExiting: self._exiting,
            m.KillActor: lambda event, out: self.kill(event.entry, event.no_restart,
                                                      event.cause, out),
            m.LeaseLost: self._lease_lost,
        }

    def _apply(self, entry, event: str, detail: str = ""):
        return table.apply(entry, event, detail, self._state.log)

    def _set_state(self, entry, event: str, detail: str, out: list) -> None:
        """Move `entry`; a dead actor's name is freed; callers are woken and
        the record published."""
        self._apply(entry, event, detail)
        if entry.state is DEAD:
            entry.address = ""
            out.append(m.ReleaseActorName(entry))
        out.append(m.ActorChanged(entry, True))

    # ------------------------------------------------------------ creation
    def _created(self, event: m.ActorCreated, out: list) -> None:
        task, worker, entry = event.task, event.worker, event.task.actor
        state = self._state
        if event.failed:
            state.release(task)
            worker.actor = None
            out.append(m.KillWorker(worker))
            self._set_state(entry, "init_failed", event.detail, out)
            out.append(m.Finish(task, event.values))
            return
        # The worker stays with the actor; the resources the task took stay
        # taken, held by the actor now.
        entry.holding = True
        entry.allocation = task.allocation
        entry.bundle_task = task if task.bundle is not None else None
        state.adopt(task, worker)
        entry.address = event.address
        self._set_state(entry, "created", "", out)
        out.append(m.Finish(task, event.values))

    def _created_elsewhere(self, event: m.ActorCreatedElsewhere, out: list) -> None:
        entry = event.task.actor
        entry.address = event.address
        entry.remote_node = event.node_hex
        if event.failed:
            self._apply(entry, "init_failed", event.detail or "the actor's __init__ failed")
        else:
            self._apply(entry, "created", f"running on node {event.node_hex}")
        out.append(m.ActorChanged(entry, False))      # its host publishes the record

    def start_failed(self, entry, error: BaseException, out: list) -> None:
        """A (re)start of `entry` that can never happen failed with `error`: the
        actor is dead and says why (a restart has no return value to carry it)."""
        if entry.state is not DEAD and entry.worker is None:
            self._set_state(entry, "init_failed", f"{type(error).__name__}: {error}", out)

    # ------------------------------------------------------------ deaths
    def worker_died(self, worker, out: list) -> None:
        """The worker hosting an actor died: what it held goes back; the actor
        restarts or is dead (and a creation still under way finishes so)."""
        entry = worker.actor
        worker.actor = None
        state = self._state
        task = worker.current_task
        if task is not None and task.actor is entry:
            # Died inside __init__ (e.g. os._exit): counts as a failed start.
            state.release(task)
        elif entry.holding:
            if entry.bundle_task is not None:
                state.bundles.release_bundle(entry.bundle_task)
            elif entry.allocation is not None:
                state.resources.release(entry.allocation)
            else:
                state.resources.release(entry.hold)
        entry.holding = False
        entry.allocation = None
        entry.worker = None
        self._set_state(entry, "killed" if entry.killed else "worker_died", entry.kill_cause, out)
        if entry.state is RESTARTING:
            entry.num_restarts += 1
            entry.killed = False
            entry.kill_cause = ""
            out.append(m.RestartActor(entry))
        elif task is not None and task.actor is entry and task.state is not TaskState.DONE:
            out.append(m.ActorCreationLost(task, entry))

    def _host_died(self, event: m.ActorHostDied, out: list) -> None:
        entry = event.entry
        entry.worker = None
        entry.remote_node = ""
        if self._apply(entry, "node_died",
                       f"the node {event.node_hex} hosting the actor died") is RESTARTING:
            entry.num_restarts += 1
            out.append(m.ActorChanged(entry, False))   # published once placed again
            out.append(m.RestartActor(entry))
        else:
            out.append(m.ActorChanged(entry, True))
            out.append(m.ReleaseActorName(entry))

    def _exiting(self, event: m.ActorExiting, out: list) -> None:
        # A restartable exit (sys.exit(1)) is a death like a crash, with its cause.
        event.entry.exiting = not event.restartable
        event.entry.kill_cause = event.reason

    # ------------------------------------------------------------ kills
    def kill(self, entry, no_restart: bool, cause: str, out: list) -> None:
        """Kill the actor here, or have its host do it; `cause` becomes its death cause."""
        if entry.state is DEAD:
            return
        if entry.remote_node and entry.worker is None \
                and not self._state.peer_dead(entry.remote_node):
            # Hosted elsewhere: its host kills it; we only stop restarting it.
            out.append(m.AskHostToKill(entry, no_restart, cause))
            if no_restart:
                entry.no_restart = True
                self._apply(entry, "killed", cause)
                out.append(m.ActorChanged(entry, False))
            return
        entry.no_restart = entry.no_restart or no_restart
        entry.killed = True
        entry.kill_cause = cause
        if entry.worker is not None:
            out.append(m.KillWorker(entry.worker))     # its death decides what follows
            return
        # Not started yet (a queued creation): it never runs.
        state = self._state
        for task in list(state.tasks.values()):
            if task.actor is entry and task.state is not TaskState.RUNNING:
                state.cancel(task, out)
        if entry.no_restart and entry.state is not DEAD:   # (a cancelled creation buried it)
            self._set_state(entry, "killed", cause, out)

    def owner_left(self, event: m.OwnerLeft, out: list) -> None:
        owner = event.owner
        for entry in list(self._state.actors.values()):
            if entry.owner is owner and not entry.detached and entry.state is not DEAD:
                self.kill(entry, True, f"the actor's owner (pid {owner.pid}) exited; a "
                          "non-detached actor dies with its owner", out)

    def owner_node_died(self, event: m.OwnerNodeDied, out: list) -> None:
        for entry in list(self._state.actors.values()):
            if entry.owner_node == event.node_hex and not entry.detached:
                self.kill(entry, True, f"the actor's owner node {event.node_hex} died", out)

    def _lease_lost(self, event: m.LeaseLost, out: list) -> None:
        for entry in list(self._state.actors.values()):
            if entry.owner_node and entry.state is not DEAD:
                self.kill(entry, True, event.cause, out)
