"""Worker leases: a local process holds one of this node's workers, and the
resources of one task, and pushes its tasks to that worker directly.

Why: a task that goes through the node costs four hops (submitter -> node
-> worker -> node -> submitter) and the node's CPU for each; a task pushed
on a lease costs two (submitter -> worker -> submitter), as an actor call
does. The node decides only once per lease -- may this process have a
worker of this kind now? -- and the holder then owns what the node would
have done per task: ordering, retries on its worker's death, cancels
(``core/task_leases.py``).

What a lease holds: the resources of one task of its class (taken from the
node's pool as a task's are) and one idle worker of its environment, taken
out of the pool. The worker is told (``LeaseChange``) before the holder
hears the answer, so the first task it is pushed finds the lease known.

When a lease is granted (every rule, so the lease never jumps work that
waits here or takes what the node has promised elsewhere):

- the node is not draining;
- the request is for plain resources on the node's own pool: no GPUs (a
  GPU worker is pinned to its devices per task) and no placement-group
  bundle (the holder sends such tasks through the node);
- nothing of the same scheduling class waits in the node's queue or for a
  worker (those came first);
- the resources fit now, and a worker of that environment is idle (and
  serves leases: it said where, in its hello).

Otherwise it is refused with the reason, and the holder sends its task
through the node as before: a refusal costs a request, never a task.

How a lease ends, and who writes each end (the lease's one writer is this
module, through :func:`_end`):

==========  ================================================================
RETURNED    the holder gave it back (idle, or closing): the worker goes back
            to the pool, the resources to the node
REVOKED     the holder went away (its session ended) or asked for the
            worker's death (a forced cancel, a broken link): the worker is
            killed -- a task it may still run must not run on beside a retry
LOST        the worker died: the holder sees its link break and retries or
            fails what it had pushed; the node only takes the resources back
==========  ================================================================

A leased worker that blocks in ``get`` lends its CPU back to the node while
it waits, as a task's worker does, so tasks it waits for can run here.

Alternatives considered: a lease per task (the node's round trip stays on
every task: nothing gained over today's path); leases that hold a worker
but not resources, taken per task (the node would again hear of every
task); leases granted by the node's queue when a task reaches its head (the
request would wait behind the queue for a worker the holder may no longer
need -- a refusal costs the holder nothing, so a lease is granted now or
not at all).

Safety rests on: a worker is leased by exactly one lease at a time
(``worker.lease`` is set here only on a worker popped from the idle list,
and cleared only by ``_end``); a leased worker runs no task of the node's
(it is in no idle list and has no ``current_task``); and every end gives
the resources back exactly once (``_end`` refuses to end an ended lease).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from meshray.common.state_names import StateName
from meshray.node.state import messages as m
from meshray.scheduler.resources import ResourceSet

__all__ = ["LeaseState", "Lease", "LeaseLife", "InvalidLeaseTransition"]


class LeaseState(StateName):
    REQUESTED = "requested"
    GRANTED = "granted"
    REFUSED = "refused"
    RETURNED = "returned"
    REVOKED = "revoked"
    LOST = "lost"


L = LeaseState
_ENDS = frozenset({L.RETURNED, L.REVOKED, L.LOST})
TRANSITIONS = {
    L.REQUESTED: frozenset({L.GRANTED, L.REFUSED}),
    L.GRANTED: _ENDS,
    L.REFUSED: frozenset(),
    L.RETURNED: frozenset(),
    L.REVOKED: frozenset(),
    L.LOST: frozenset(),
}


class InvalidLeaseTransition(RuntimeError):
    """A lease move the table does not allow: a bug, told with the lease's story."""

    def __init__(self, lease, new: LeaseState, cause: str):
        story = "\n".join(f"  {old} -> {to}: {why}" for old, to, why in lease.story) or "  (none)"
        super().__init__(
            f"lease {lease.lease_id.hex()} (holder {lease.holder_hex}) cannot move from "
            f"{lease.state} to {new} ({cause}); allowed from {lease.state}: "
            f"{', '.join(sorted(str(s) for s in TRANSITIONS[lease.state])) or 'nothing'}.\n"
            f"Its moves:\n{story}")


@dataclass(eq=False)
class Lease:
    """One lease request and, if granted, the lease itself."""
    lease_id: bytes
    holder: object                 # the holder's Connection (conn_id, worker_id, job_id)
    hold: ResourceSet              # the resources of one task of its class
    worker_key: str                # the environment its worker serves
    sched_class: object            # the class of the tasks it runs (TaskQueue's key)
    requested_wall: float
    state: LeaseState = L.REQUESTED
    worker: object = None
    granted_wall: float = 0.0
    ended_wall: float = 0.0
    reason: str = ""               # why it was refused or ended
    cpu_lent: bool = False         # its worker blocks in get: its CPU is back in the pool
    story: deque = field(default_factory=lambda: deque(maxlen=8))

    @property
    def holder_hex(self) -> str:
        return (getattr(self.holder, "worker_id", b"") or b"").hex()

    def record(self) -> dict:
        """What the state API shows of it."""
        worker = self.worker
        return {"lease_id": self.lease_id.hex(), "state": str(self.state).upper(),
                "holder_worker_id": self.holder_hex,
                "job_id": (getattr(self.holder, "job_id", b"") or b"").hex(),
                "worker_id": worker.worker_id.hex() if worker is not None else "",
                "worker_pid": worker.pid if worker is not None else 0,
                "resources": self.hold.to_dict(), "granted_at": self.granted_wall,
                "ended_at": self.ended_wall, "reason": self.reason}


class LeaseLife:
    """The node's worker leases: granted, returned, revoked, lost.

    `machine` is the node's ``NodeState``: its resources, queue, worker pool,
    tasks awaiting workers and draining flag are read here; resources and
    idle workers are taken and given back here for leases only.
    """

    KEEP_ENDED = 256      # ended leases kept for the state API

    def __init__(self, machine):
        self._machine = machine
        self.granted: dict[bytes, Lease] = {}          # lease id -> GRANTED lease
        self._by_holder: dict[int, set] = {}           # holder conn id -> its lease ids
        self.ended: deque = deque(maxlen=self.KEEP_ENDED)
        self.counts = {str(s): 0 for s in (L.GRANTED, L.REFUSED, L.RETURNED, L.REVOKED, L.LOST)}

    def handlers(self) -> dict:
        return {m.LeaseRequested: self._requested, m.LeaseReturned: self._returned}

    # ------------------------------------------------------------ moves
    def _move(self, lease: Lease, new: LeaseState, cause: str) -> None:
        if new not in TRANSITIONS[lease.state]:
            raise InvalidLeaseTransition(lease, new, cause)
        lease.story.append((lease.state, new, cause))
        lease.state = new
        self.counts[str(new)] = self.counts.get(str(new), 0) + 1
        log = self._machine.log
        if log is not None:
            log.record("lease", lease.lease_id, lease.story[-1][0], new, cause)

    # ------------------------------------------------------------ events
    def _requested(self, event: m.LeaseRequested, out: list) -> None:
        lease = event.lease
        reason = self._refusal(lease)
        if reason:
            lease.reason = reason
            self._move(lease, L.REFUSED, reason)
            return
        machine = self._machine
        if not machine.resources.try_acquire(lease.hold):
            lease.reason = "its resources are not free on this node now"
            self._move(lease, L.REFUSED, lease.reason)
            return
        worker = machine.workers.pop_idle(lease.worker_key)
        if worker is None or not worker.call_address:
            if worker is not None:       # (a hollow node's worker serves no leases)
                machine.workers.push_idle(worker)
            machine.resources.release(lease.hold)
            lease.reason = "no worker of its environment is idle on this node now"
            self._move(lease, L.REFUSED, lease.reason)
            return
        worker.lease = lease
        worker.current_task = None
        lease.worker = worker
        lease.granted_wall = event.wall
        self.granted[lease.lease_id] = lease
        self._by_holder.setdefault(lease.holder.conn_id, set()).add(lease.lease_id)
        self._move(lease, L.GRANTED, f"worker {worker.pid}")
        out.append(m.GrantLease(lease, worker))

    def _refusal(self, lease: Lease) -> str:
        machine = self._machine
        if machine.draining:
            return "the node is draining"
        if lease.hold.get("GPU"):
            return "a lease holds no GPUs (tasks that need GPUs go through the node)"
        if machine.queue.has_class(lease.sched_class) or any(
                t.sched_class == lease.sched_class for t in machine.awaiting):
            return "tasks of its class wait on this node"
        return ""

    def _returned(self, event: m.LeaseReturned, out: list) -> None:
        lease = self.granted.get(event.lease_id)
        if lease is None or lease.holder.conn_id != event.holder_conn_id:
            return     # ended already (its worker died first), or not this holder's
        if event.kill:
            self._end(lease, L.REVOKED, f"its holder asked for the worker's end: {event.why}",
                      out, wall=event.wall)
        else:
            self._end(lease, L.RETURNED, "its holder gave it back", out,
                      now=event.now, wall=event.wall)

    # ------------------------------------------------------------ from the machine
    def worker_lost(self, worker, out: list) -> None:
        """A leased worker died (its holder sees its link break)."""
        lease = getattr(worker, "lease", None)
        if lease is not None:
            self._end(lease, L.LOST, f"worker {worker.pid} died", out)

    def holder_left(self, conn_id: int, out: list) -> None:
        """The holder's session ended: its workers may still run its tasks."""
        for lease_id in list(self._by_holder.get(conn_id, ())):
            lease = self.granted.get(lease_id)
            if lease is not None:
                self._end(lease, L.REVOKED, "its holder's session ended", out)

    def blocked(self, worker, blocked: bool) -> bool:
        """A leased worker blocks in get (or resumes): lend its CPU back.
        False if `worker` holds no lease."""
        lease = getattr(worker, "lease", None)
        if lease is None:
            return False
        resources = self._machine.resources
        cpu = ResourceSet.from_dict({"CPU": lease.hold.get("CPU", 0.0)})
        if blocked and not lease.cpu_lent and not cpu.is_empty():
            resources.release(cpu)
            lease.cpu_lent = True
        elif not blocked and lease.cpu_lent and resources.try_acquire(cpu):
            # Taken meanwhile: it runs on without it (a brief oversubscription)
            # rather than deadlock waiting for it, as a task's worker does.
            lease.cpu_lent = False
        return True

    def _end(self, lease: Lease, new: LeaseState, cause: str, out: list, *,
             now: float = 0.0, wall: float = 0.0) -> None:
        self._move(lease, new, cause)
        lease.reason = cause
        lease.ended_wall = wall
        self.granted.pop(lease.lease_id, None)
        held = self._by_holder.get(lease.holder.conn_id)
        if held is not None:
            held.discard(lease.lease_id)
            if not held:
                del self._by_holder[lease.holder.conn_id]
        machine = self._machine
        lent = ResourceSet.from_dict({"CPU": lease.hold.get("CPU", 0.0)}) \
            if lease.cpu_lent else ResourceSet()
        machine.resources.release(lease.hold - lent)
        lease.cpu_lent = False
        worker = lease.worker
        worker.lease = None
        self.ended.append(lease)
        if new is L.RETURNED:
            out.append(m.EndLease(lease, worker))
            machine.worker_free(worker, now, wall, out)
        elif new is L.REVOKED:
            out.append(m.KillWorker(worker))

    def find(self, lease_id: bytes):
        """The lease `lease_id`, granted or among the last ended; None if unknown."""
        lease = self.granted.get(lease_id)
        if lease is None:
            lease = next((e for e in self.ended if e.lease_id == lease_id), None)
        return lease

    def records(self) -> list[dict]:
        """Every granted lease and the last ended ones, for the state API."""
        return [lease.record() for lease in (*self.granted.values(), *self.ended)]
