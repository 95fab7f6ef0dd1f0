"""What goes into the node's state machine and what comes out of it.

Events are facts the daemon learned (a worker connected, a result arrived, a
worker's stream closed); instructions are what the state machine decided must
happen outside it (send this task to that worker, start workers, deliver a
task's values). Both are small records of plain values and of the node's own
handles (task records, worker handles), so a unit test builds them by hand and
compares them with ``==``. Nothing changes one once made; they are not
``frozen`` only because a frozen dataclass costs three times as much to build
(~0.24 µs against ~0.08 µs), and the node builds several per task.

Times come in with events -- ``now`` from the monotonic clock (run-time
statistics), ``wall`` from the wall clock (task events) -- because the state
machine reads no clock.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    # events
    "Submitted", "PlaceWhenArgsReady", "Decided", "ViewChanged", "MemberAbsent", "Refused",
    "Schedule", "Offer",
    "Enqueue", "Dequeue", "WorkerReady", "WorkerStartFailed", "TaskReturned",
    "WorkerLost", "Cancel", "StopRunning", "Blocked", "Release", "EnvSetupFailed", "Drain",
    "Fail", "LeaseRequested", "LeaseReturned",
    # actor events
    "ActorCreated", "ActorCreatedElsewhere", "ActorHostDied", "ActorExiting", "KillActor",
    "OwnerLeft", "OwnerNodeDied", "LeaseLost",
    # object events
    "RefsChanged", "Subscribe", "Put", "StreamItem", "Produced", "ValueArrived", "CopyMoved",
    "Lost",
    # instructions
    "Execute", "Prefetch", "EnsureWorkers", "Finish", "FailTask", "Replace",
    "ReplaceLater", "KillWorker", "KillTask", "ReportCrash", "CancelRemote", "Unwait",
    "GroupRemoved", "Spill", "ConfirmMember", "Notice", "GrantLease", "EndLease",
    # actor instructions
    "ActorChanged", "ReleaseActorName", "RestartActor", "AskHostToKill", "ActorCreationLost",
    # object instructions
    "Deliver", "FreeValue", "ValuesReady", "TellOwners",
]


# ---------------------------------------------------------------- events
@dataclass(slots=True)
class Submitted:
    """A local process submitted `task`: it holds the task's returns and
    waits for them; the task's arguments stay alive until it finishes, and
    it is placed once every argument has its value."""
    task: object


@dataclass(slots=True)
class PlaceWhenArgsReady:
    """WAITING `task` runs again (its node died): placed once every argument
    has its value -- one whose only copy died with that node waits for its
    rebuild, so the task holds no resources a rebuild may need meanwhile."""
    task: object


@dataclass(slots=True)
class Decided:
    """Placement's verdict on WAITING `task` (``scheduler.policy``: its
    `kind` -- run_local, wait, placement_group, spill with `candidates`,
    unschedulable or infeasible with a `reason`), made from the cluster view:
    what it means for the task is this machine's to carry out."""
    task: object
    decision: object
    now: float
    wall: float


@dataclass(slots=True)
class ViewChanged:
    """The cluster view changed: tasks that fit no node are placed again."""


@dataclass(slots=True)
class MemberAbsent:
    """etcd has no member `node_hex`, which INFEASIBLE `task` is pinned to
    by hard affinity (ConfirmMember asked): it fails with `reason`."""
    task: object
    node_hex: str
    reason: str


@dataclass(slots=True)
class Refused:
    """The peer `node_hex` refused SPILLED `task`: the next candidate, or
    back in line here."""
    task: object
    node_hex: str


@dataclass(slots=True)
class Schedule:
    """Resources, workers or the queue changed: start what fits now."""
    now: float
    wall: float


@dataclass(slots=True)
class Offer:
    """A peer offers `task`: start it if it fits now; else queue it when
    `backlog` (there is room in the node's backlog), else leave it WAITING --
    the offer is refused."""
    task: object
    now: float
    wall: float
    backlog: bool


@dataclass(slots=True)
class Enqueue:
    """`task` waits in this node's queue (`cause`: why), for room here or a
    peer with room."""
    task: object
    cause: str


@dataclass(slots=True)
class Dequeue:
    """Queued `task` leaves the line to be offered to a peer (it stays QUEUED
    until the offer moves it)."""
    task: object


@dataclass(slots=True)
class WorkerReady:
    """`worker` connected, or finished what it ran: it takes the next task
    waiting for a worker of its kind, or becomes idle."""
    worker: object
    now: float
    wall: float


@dataclass(slots=True)
class WorkerStartFailed:
    """A worker of `worker_key` exited before it connected."""
    worker_key: str


@dataclass(slots=True)
class TaskReturned:
    """`worker` reported `task`'s result (not an actor creation's, not a
    generator item). `retryable` when the task raised an error its retry
    options cover."""
    worker: object
    task: object
    values: object          # its return values, in order (a sequence)
    retryable: bool
    now: float
    wall: float


@dataclass(slots=True)
class WorkerLost:
    """`worker`'s stream closed (it died, or was killed). The shell adds what
    only it can know: whether the owner of the task it ran can still take a
    retry's result, and -- for a task killed because its bundle left this
    node -- whether its placement group is known to be removed."""
    worker: object
    owner_present: bool
    group_gone: bool = False


@dataclass(slots=True)
class Cancel:
    """The owner cancelled `task` (children are the shell's to walk)."""
    task: object
    force: bool
    recursive: bool = False


@dataclass(slots=True)
class StopRunning:
    """`task`'s worker must stop now: its job's driver left or this node's
    lease lapsed (`why` "cancelled": it fails as cancelled, never retried), or
    its bundle left this node ("bundle_left": its group's fate decides, once
    the worker is gone)."""
    task: object
    why: str


@dataclass(slots=True)
class Blocked:
    """`worker` blocked in (or returned from) ``get``: lend or take back the
    CPU its task holds."""
    worker: object
    blocked: bool


@dataclass(slots=True)
class Release:
    """`task` leaves this node's bookkeeping without a result here (its actor
    took over its worker, its owner's node died, the node drains): give back
    its resources, its worker, its place in line."""
    task: object


@dataclass(slots=True)
class EnvSetupFailed:
    """The runtime environment behind `worker_key` could not be set up:
    the tasks waiting for its workers fail with `error`."""
    worker_key: str
    error: BaseException


@dataclass(slots=True)
class Drain:
    """The node started draining: it starts no more queued work."""


@dataclass(slots=True)
class Fail:
    """`task` fails with `error`, decided outside the machine (its group was
    removed, its spill target died and it has no retry left): it gives back
    what it holds, and its actor, if it is a creation, does not start."""
    task: object
    error: BaseException


# ---------------------------------------------------------------- actor events
@dataclass(slots=True)
class ActorCreated:
    """The creation task of an actor hosted here returned on `worker`: the
    actor serves at `address`, or its ``__init__`` failed (`failed`, with
    `detail`); `values` are the task's return values."""
    task: object
    worker: object
    failed: bool
    detail: str
    address: str
    values: tuple


@dataclass(slots=True)
class ActorCreatedElsewhere:
    """Peer `node_hex` ran the creation task of an actor created here: it
    serves there at `address`, or its ``__init__`` failed (`failed`, `detail`)."""
    task: object
    node_hex: str
    failed: bool
    detail: str
    address: str


@dataclass(slots=True)
class ActorHostDied:
    """Peer `node_hex`, which hosted `entry` for this node, died."""
    entry: object
    node_hex: str


@dataclass(slots=True)
class ActorExiting:
    """The worker hosting `entry` says the actor exits: on purpose (no
    restart) unless `restartable`; `reason` becomes its death cause."""
    entry: object
    restartable: bool
    reason: str


@dataclass(slots=True)
class KillActor:
    """Kill `entry` (``meshray.kill``, its group removed, its owner gone);
    no restart after it when `no_restart`; `cause` becomes its death cause."""
    entry: object
    no_restart: bool
    cause: str


@dataclass(slots=True)
class LeaseRequested:
    """A local process asks for a worker lease (`lease`, REQUESTED: what it
    would hold): granted now, or refused with the reason (lease_life.py)."""
    lease: object
    now: float
    wall: float


@dataclass(slots=True)
class LeaseReturned:
    """The holder (connection `holder_conn_id`) ends lease `lease_id`: its
    worker back to the pool, or killed when `kill` (`why` says why)."""
    lease_id: bytes
    holder_conn_id: int
    kill: bool
    why: str
    now: float
    wall: float


@dataclass(slots=True)
class OwnerLeft:
    """The local process behind connection `owner` exited: what it held is
    released, and the actors it created die with it unless detached."""
    owner: object


@dataclass(slots=True)
class OwnerNodeDied:
    """Peer `node_hex` died: what it borrowed (and the refs kept for its
    containers) is released; actors hosted here for it die unless detached."""
    node_hex: str


@dataclass(slots=True)
class LeaseLost:
    """This node's etcd lease expired (peers think it dead and restart what
    it hosts for them): every actor hosted here for a peer dies, `cause` saying why."""
    cause: str


# ---------------------------------------------------------------- object events
# A holder is a local connection's id, or a peer's holder id ("node:<hex>",
# "node:<hex>:<container id>"), or a name for a hold the node takes itself.
@dataclass(slots=True)
class RefsChanged:
    """`holder` took refs to the objects in `add` and dropped those in
    `remove`; with `claim`, `holder` is the owner claiming actor returns
    handed to it (its hold replaces the actor's)."""
    holder: object
    add: tuple = ()
    remove: tuple = ()
    claim: bool = False


@dataclass(slots=True)
class Subscribe:
    """`holder` wants the values of `object_ids` (now, or when produced)."""
    holder: object
    object_ids: tuple


@dataclass(slots=True)
class Put:
    """A local process registers `value`: its own put, or (`handoff`) an
    actor's return held for its caller until the caller registers it."""
    holder: object
    value: object
    handoff: bool = False


@dataclass(slots=True)
class StreamItem:
    """A streaming task produced `value`, which `holder` (its owner) holds and wants."""
    holder: object
    value: object


@dataclass(slots=True)
class Produced:
    """`values` exist now (a task's returns, a copy found, an error); `holder`
    holds each when given (a peer owner whose bytes we keep); `unpin`: the
    ids a finished task kept alive."""
    values: tuple
    holder: object = None
    unpin: tuple = ()


@dataclass(slots=True)
class ValueArrived:
    """A peer sent `value`, which this node asked for (ignored when nobody
    here wants it any more)."""
    value: object


@dataclass(slots=True)
class CopyMoved:
    """A ready object's bytes are now where `value` says (a pull, a rebuilt copy)."""
    value: object


@dataclass(slots=True)
class Lost:
    """The only copy of each of `object_ids` is gone: each waits for its value
    again -- `error` when given (it cannot be rebuilt), else its producer's
    new run, whose arguments `pin` keeps alive until it finishes."""
    object_ids: tuple
    error: BaseException | None = None
    pin: tuple = ()


# ---------------------------------------------------------------- instructions
@dataclass(slots=True)
class Execute:
    """Send `task` to `worker` (as its current task or pipelined behind it)."""
    task: object
    worker: object


@dataclass(slots=True)
class Prefetch:
    """Start pulling `task`'s arguments that live on other nodes: it got its
    resources here, so the copies travel while its worker is found. (Only for
    a task with object arguments.)"""
    task: object


@dataclass(slots=True)
class EnsureWorkers:
    """`wanted` tasks wait for a worker of `task`'s kind: have that many
    starting (setting up its runtime environment first when it needs one)."""
    task: object
    wanted: int


@dataclass(slots=True)
class Finish:
    """`task` finished here: deliver `values` to its owner."""
    task: object
    values: tuple


@dataclass(slots=True)
class FailTask:
    """`task` failed with `error` decided by the node (its resources are
    already given back): deliver the error as every return value, and fail
    its actor's start when it is a creation."""
    task: object
    error: BaseException


@dataclass(slots=True)
class Replace:
    """`task` is WAITING to be placed -- new with its arguments ready, or again
    (a retry, its worker died before running it): placement decides where it
    runs."""
    task: object


@dataclass(slots=True)
class ReplaceLater:
    """As Replace, after `delay` seconds (the memory monitor's backoff)."""
    task: object
    delay: float


@dataclass(slots=True)
class GrantLease:
    """Tell `worker` it is leased (LeaseChange), before the holder hears so."""
    lease: object
    worker: object


@dataclass(slots=True)
class EndLease:
    """Tell `worker` its lease is over: calls under it are refused from now on."""
    lease: object
    worker: object


@dataclass(slots=True)
class KillWorker:
    """Kill `worker`'s process now."""
    worker: object


@dataclass(slots=True)
class KillTask:
    """Ask `worker` to interrupt `task` (a cancel that is not forced)."""
    task: object
    worker: object


@dataclass(slots=True)
class ReportCrash:
    """`task` is CRASHED: wait for `worker`'s exit status, then fail the task
    with an error that names it."""
    task: object
    worker: object


@dataclass(slots=True)
class CancelRemote:
    """`task` runs on a peer (SPILLED): ask that peer to cancel it."""
    task: object
    force: bool
    recursive: bool


@dataclass(slots=True)
class Unwait:
    """Cancelled `task` leaves the list that held it while it waited outside
    this machine, for its placement group's bundle (WAITING_GROUP; `state`
    says so)."""
    task: object
    state: object


@dataclass(slots=True)
class GroupRemoved:
    """`task` lost its bundle and its placement group is removed: it fails
    with the group-removed error."""
    task: object


@dataclass(slots=True)
class Spill:
    """Offer `task` to the first reachable of `candidates` (the rest are
    its next candidates); queue it here when none is reachable."""
    task: object
    candidates: list


@dataclass(slots=True)
class ConfirmMember:
    """Ask etcd whether `node_hex` is a member (`task`, pinned to it by hard
    affinity, waits INFEASIBLE meanwhile): MemberAbsent when it is not; when
    it is, nothing -- the view has yet to show it, and its change places
    the task again."""
    task: object
    node_hex: str
    reason: str


@dataclass(slots=True)
class Notice:
    """Tell `task`'s owner `text` (once: a task no node can fit)."""
    task: object
    text: str


# ---------------------------------------------------------------- actor instructions
@dataclass(slots=True)
class ActorChanged:
    """`entry` changed: wake whoever waits on it, and queue its record for
    etcd when `publish`."""
    entry: object
    publish: bool


@dataclass(slots=True)
class ReleaseActorName:
    """`entry` is dead: free its name in etcd (if the name still maps to it)."""
    entry: object


@dataclass(slots=True)
class RestartActor:
    """Place a new creation task for `entry` (the next attempt of its spec)."""
    entry: object


@dataclass(slots=True)
class AskHostToKill:
    """Ask the peer hosting `entry` to kill it (with `no_restart` and `cause`)."""
    entry: object
    no_restart: bool
    cause: str


@dataclass(slots=True)
class ActorCreationLost:
    """`entry` died for good before its creation `task` returned: the task's
    values are the actor's death (``ActorDiedError``, with its cause)."""
    task: object
    entry: object


# ---------------------------------------------------------------- object instructions
@dataclass(slots=True)
class Deliver:
    """Send `value` to `holder` (a local connection, or a peer's holder id)."""
    holder: object
    value: object


@dataclass(slots=True)
class FreeValue:
    """Nothing references `value` any more: drop its bytes wherever they are."""
    value: object


@dataclass(slots=True)
class ValuesReady:
    """`object_ids` have their values: wake readers in the node waiting for them."""
    object_ids: tuple


@dataclass(slots=True)
class TellOwners:
    """Tell the owner nodes which of their objects this node now borrows,
    no longer borrows, and wants the values of."""
    borrows: list
    unborrows: list
    fetches: list
