"""The node daemon's duties towards its peers (`daemon.peers`, a PeerDuties).

- Placement: a task that should not run here (policy.decide) is offered to a
  peer (SpillTask); a peer whose real availability differs refuses, and the
  next candidate gets it. Infeasible work waits and is re-placed when the
  cluster view changes. Peers' room comes from the etcd view or, fresher,
  from the load each peer attaches to its batches (scheduler/peer_load.py);
  a batch that shows room gets queued work offered at once. A peer also
  queues a few offers behind its busy workers (its backlog), so it starts the
  next task the moment one finishes, without waiting for a round trip.
- Results of a task that ran here for another node go back to that node; the
  values stay in this node's store and the owner frees them (FreeObjects).
- Objects: the node whose id prefixes an object id owns its directory entry.
  Other nodes borrow (RefUpdate to the owner, in order on the peer link),
  ask for values (Subscribe / ObjectReady), and pull store values in chunks.
- Node death (its lease vanished from the view): work spilled there is
  retried, actors it hosted for us are restarted, objects whose only copy
  lived there are rebuilt from lineage or reported lost.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from typing import Callable

from meshray import exceptions
from meshray.common import ids
from meshray.node.actors import ActorEntry
from meshray.node.membership import retry_delay
from meshray.node.cluster_view import SPILL_SAMPLE, ClusterView
from meshray.node.objects import container_holder, holder_node
from meshray.node.peers import PeerLink
from meshray.node.placement_groups import pg_strategy
from meshray.node.routes import answer
from meshray.node.state import RETRY, retry_or_fail
from meshray.node.state import messages as m
from meshray.node.task_lifecycle import TaskState
from meshray.node.tasks import TaskRecord
from meshray.rpc.generated import meshray_pb2 as pb
from meshray.scheduler import policy
from meshray.scheduler.resources import ResourceSet

__all__ = ["PeerDuties", "RemoteOwner"]

log = logging.getLogger(__name__)

REPLACE_INTERVAL_S = 0.02
IDLE_CHECK_S = 1.0
# A peer also accepts offers it can't start at once while its own backlog is
# short (per CPU), so a busy cluster keeps every node fed between view updates.
SPILL_BACKLOG_PER_CPU = 2


class RemoteOwner:
    """Stands in for the submitting Connection of a task spilled here."""

    role = "peer"
    closed = False

    def __init__(self, node_hex: str):
        self.node_hex = node_hex
        self.conn_id = f"node:{node_hex}"
        self.pid = 0

    def send(self, event) -> None:  # notices for a remote owner are dropped
        return None


class PeerDuties:
    """This node among its peers (the module docstring says what that takes).

    It owns the peer links, the picture of the peers (`view`), the tasks
    that fit no node in the view, questions out to peers, the lineage of
    results held elsewhere, and the actors created here that run on a peer.
    It keeps the node's tables, resources, queue and store, which live as
    long as the node, and the node itself for what is made later or belongs
    to another part: membership, worker pool, dispatch, drain, placement
    groups, transfers, routes, log streams, and the task and actor
    lifecycles the node owns (move, fail, finish, kill, restart, publish).
    """

    def __init__(self, node):
        self._node = node
        self._node_hex = node.node_hex
        self._config = node.config
        self._resources = node.resources
        self._queue = node.queue
        self._queued = asyncio.Event()              # set when work is queued here
        self._queue.on_push = self._queued.set
        self._tasks = node.tasks
        self._functions = node.functions
        self._objects = node.objects
        self._store = node.store
        self.links: dict[str, PeerLink] = {}
        # Deliveries that became due since the count was last read: a daemon
        # handling a long client batch yields to let them start (daemon.py).
        self.deliveries_due = 0
        self.view = ClusterView(self._node_hex)     # peers, their room, offers out
        # Called with a peer's id when it is first seen dead (a simulation notes when).
        self.on_death: Callable[[str], None] | None = None
        self._questions: dict[int, asyncio.Future] = {}   # request id -> its answer, awaited
        self._question_ids = itertools.count(1)
        self._value_from: dict[bytes, str] = {}     # object id -> node that pre-holds its contents
        self._lineage: dict[bytes, object] = {}     # task id -> finished task (results elsewhere)
        self._remote_actors: dict[bytes, dict] = {}  # actors we created that live elsewhere
        self._notices: list = []                    # TellOwners not sent yet (flush_borrows)

    # ------------------------------------------------------------ view
    def on_view_change(self) -> None:
        """The membership's view changed: handle who left, place waiting work again."""
        if self._node.membership is None:
            return
        membership = self._node.membership
        node_changes, avail_changes = membership.view_changes()
        gone = self.view.apply(node_changes, avail_changes, time.monotonic(),
                               avail_bits=membership.avail_bits)
        for node_hex in gone:
            self.node_died(node_hex)
        self.replace_waiting()
        self._node.dispatch.schedule()

    def on_lease_lost(self) -> None:
        """Our lease expired: peers consider us dead and re-run our guests' work.

        So the work we run for other nodes stops here: their tasks, and the
        actors they created on us (restarted elsewhere or declared dead by now).
        """
        self._node.dispatch.handle(m.LeaseLost(f"node {self._node_hex} lost its etcd lease"))
        for task in list(self._tasks.values()):
            if isinstance(task.owner, RemoteOwner):
                running = task.worker is not None
                self._node.dispatch.handle(m.StopRunning(task, "cancelled"))
                if not running:
                    self._drop_task(task)

    def _node_views(self, backlog_for: dict | None = None, only=None,
                    local_waiting: float = float("inf")) -> dict:
        """The views policy.decide sees (cluster_view.py), this node's own live."""
        local = policy.NodeView(self._node_hex, self._resources.total, self._resources.available,
                                not self._node.drain.draining, dict(self._config.labels))
        per_cpu = local_waiting / max(1.0, self._resources.total.get("CPU", 1.0))
        return self.view.node_views(local, time.monotonic(), backlog_for, only, per_cpu)

    def _decide(self, request, spread: int, backlog_for: dict | None = None,
                local_waiting: float = float("inf")):
        """policy.decide, on a few sampled peers first for DEFAULT work
        (cluster_view.py says why); the whole view when they have no room."""
        if request.strategy == "DEFAULT":
            sample = self.view.sample_peers(SPILL_SAMPLE, request.arg_bytes_by_node)
            if sample is not None:
                decision = policy.decide(
                    request, self._node_views(backlog_for, sample, local_waiting),
                    self._node_hex, spread)
                if decision.kind in ("spill", "run_local"):
                    return decision
        return policy.decide(request, self._node_views(backlog_for, None, local_waiting),
                             self._node_hex, spread)

    def link(self, node_hex: str) -> PeerLink | None:
        """The link to `node_hex` (opened on first use); None when the view has no address."""
        link = self.links.get(node_hex)
        if link is None:
            record = self.view.nodes.get(node_hex)
            if record is None or not record.get("Address"):
                return None
            link = self.links[node_hex] = PeerLink(self._node.node_id, node_hex, record["Address"],
                                                   self._config.token, load=self._load_report,
                                                   on_start=self._delivery_due)
        return link

    def _delivery_due(self) -> None:
        self.deliveries_due += 1

    def send(self, node_hex: str, event: pb.PeerEvent) -> bool:
        """Queue `event` for `node_hex`, in order; False when it has no link."""
        link = self.link(node_hex)
        if link is None:
            return False
        link.send(event)
        return True

    def links_idle(self) -> bool:
        """Whether every event queued for a peer has been delivered (a drain waits)."""
        return not any(link.pending for link in self.links.values())

    # ------------------------------------------------------------ placement
    def _placement(self, task):
        """policy.decide for `task`, cheap when it plainly runs here."""
        spec = task.spec
        strategy = spec.scheduling_strategy or "DEFAULT"
        if spec.strategy_blob:
            import cloudpickle
            strategy = cloudpickle.loads(spec.strategy_blob)
        if strategy == "DEFAULT" and not self._node.drain.draining and (
                self._resources.can_fit(task.request)
                # Alone in the view: whatever fits this node at all waits here.
                or (len(self.view.nodes) <= 1 and self._resources.is_feasible(task.request))
        ) and not self._args_elsewhere(spec):
            return policy.RunLocal()
        task.only_elsewhere = not policy.may_run_on(strategy, self._node_hex, self._config.labels)
        request = policy.SchedulingRequest(
            task.request, strategy, self._arg_bytes_by_node(spec),
            excluded_nodes=frozenset(task.refused_by))
        spread = self.view.next_spread()
        started = time.perf_counter()
        decision = self._decide(request, spread)
        if (decision.kind == "wait" and strategy == "DEFAULT" and task.actor is None
                and task.bundle is None and self.view.loads):
            # Nobody can start it now: a peer that would queue it takes it,
            # so it starts there the moment a worker frees up -- if that is
            # sooner than here, behind what waits here (itself included);
            # never here, if this node could not run it at all.
            waiting = (self._queue.waiting() + (task.state is not TaskState.QUEUED)
                       if self._resources.is_feasible(task.request) else float("inf"))
            queued = self._decide(request, spread, task.request.to_dict(), waiting)
            if queued.kind == "spill":
                decision = queued
        self._node.metrics.spill_decided(time.perf_counter() - started)
        return decision

    def _args_elsewhere(self, spec) -> bool:
        for object_id in spec.arg_ref_ids:
            value = self._objects.get(object_id)
            if value is not None and value.in_store and value.location not in ("", self._node_hex):
                return True
        return False

    def _arg_bytes_by_node(self, spec) -> dict:
        sizes: dict[str, int] = {}
        for object_id in spec.arg_ref_ids:
            value = self._objects.get(object_id)
            if value is not None and value.in_store:
                node = value.location or self._node_hex
                sizes[node] = sizes.get(node, 0) + value.size
        return sizes

    def place_or_queue(self, task) -> None:
        """Queue here, spill, or hold as infeasible, per the placement decision."""
        if isinstance(task.owner, RemoteOwner):
            # Spilled to us: it runs here.
            self._node.dispatch.handle(m.Enqueue(task, "accepted from a peer"))
            return
        if task.bundle is None and pg_strategy(task.spec) is not None:
            self._node.placement.route_to_group(task)
            return
        # What the decision means for the task is the node state machine's.
        self._node.dispatch.handle(m.Decided(task, self._placement(task), time.monotonic(),
                                             time.time()))

    def replace_waiting(self) -> None:
        """Re-place infeasible tasks, and queued ones that a peer could run now."""
        self._node.dispatch.handle(m.ViewChanged())
        self.offer_queued()

    def offer_queued(self) -> None:
        """Offer queued tasks that cannot run here now to peers with room."""
        for task in self._queue.held():
            # Only a peer may run it: offer it to one with room, fail it once
            # none ever can (its node died), else keep it held.
            decision = self._placement(task)
            if decision.kind in ("spill", "unschedulable"):
                self._dequeue_decided(task, decision)
        if len(self.view.nodes) <= 1:
            return
        for _key, tasks in list(self._queue.heads()):
            # Offer queued work to peers with room, head first, until none has
            # room by our (offer-adjusted) view.
            while tasks:
                task = tasks[0]
                if isinstance(task.owner, RemoteOwner) or (
                        self._resources.can_fit(task.request) and not self._node.drain.draining):
                    break
                decision = self._placement(task)
                if decision.kind != "spill":
                    break
                self._dequeue_decided(task, decision)

    def _dequeue_decided(self, task, decision) -> None:
        """Queued `task` leaves the line for what placement now says (a peer, or failure)."""
        dispatch = self._node.dispatch
        dispatch.handle(m.Dequeue(task))
        dispatch.handle(m.Decided(task, decision, time.monotonic(), time.time()))

    async def run(self, stopping: asyncio.Event) -> None:
        """Re-place waiting work every REPLACE_INTERVAL_S while peers exist: a
        peer's room may show up without a view change (its load on a batch).

        With nothing queued it sleeps until something is (or IDLE_CHECK_S
        passes, to notice `stopping`): a node that woke 50 times a second
        for an empty queue cost its machine ~0.2% of a core doing nothing,
        which a host of hundreds of hollow nodes (docs/scale.md) cannot pay."""
        while not stopping.is_set():
            if not len(self._queue):
                self._queued.clear()
                try:
                    await asyncio.wait_for(self._queued.wait(), IDLE_CHECK_S)
                except asyncio.TimeoutError:
                    continue
            await asyncio.sleep(REPLACE_INTERVAL_S)
            if len(self._queue) and len(self.view.nodes) > 1:
                self.replace_waiting()
                self._node.dispatch.schedule()

    def spill(self, task, candidates: list) -> None:
        """Offer `task` to the first reachable candidate; queue it here when none is."""
        while candidates:
            node_hex = candidates.pop(0)
            link = self.link(node_hex)
            if link is None:
                continue
            spec = task.spec
            event = pb.SpillTask(spec=spec)
            if spec.function_id not in link.functions_sent:
                event.function_pickled = self._functions.get(spec.function_id, b"")
                link.functions_sent.add(spec.function_id)
            for object_id in spec.arg_ref_ids:
                value = self._objects.get(object_id)
                event.args.append(self.exportable(value))
            task.remote_node = node_hex          # before the move: its record says where
            self._node._move(task, TaskState.SPILLED, f"offered to node {node_hex}")
            task.spill_candidates = candidates
            self.view.offer(node_hex, spec.task_id, task.request.to_dict())
            link.send(pb.PeerEvent(spill=event))
            return
        task.refused_by.clear()
        self._node.dispatch.handle(m.Enqueue(task, "no candidate peer reachable"))

    def exportable(self, value):
        """A copy of `value` that says where its store bytes live."""
        if value is None or not value.in_store or value.location:
            return value
        out = pb.ObjectValue()
        out.CopyFrom(value)
        out.location = self._node_hex
        return out

    # ------------------------------------------------------------ peer rpc
    def deliver(self, request: pb.PeerBatch) -> pb.PeerAck:
        """A batch of events from a peer (the daemon's NodePeer.Deliver)."""
        node = self._node
        from_hex = request.from_node.hex()
        has_load = request.HasField("load")
        if has_load:
            self.view.note_load(from_hex, request.load, time.monotonic())
        for event in request.events:
            kind = event.WhichOneof("kind")
            try:
                node.routes.peer[kind](from_hex, getattr(event, kind))
            except Exception:  # noqa: BLE001 - one bad event never takes the node down
                log.exception("failed to handle peer event %s from %s", kind, from_hex)
        self.flush_borrows()
        if has_load and len(self._queue):
            # The freshest word on the sender (a result, a verdict): offer
            # it queued work now rather than at the next re-placement tick.
            self.offer_queued()
        self._node.dispatch.schedule()
        return pb.PeerAck()

    def _load_report(self) -> pb.NodeLoad:
        """Our load, attached to every batch we send a peer (peers.py)."""
        return pb.NodeLoad(available=self._resources.available.to_dict(),
                           backlog_room=self._backlog_room(), queued=self._queue.waiting())

    def _backlog_room(self) -> int:
        """How many more offers we would queue behind busy workers."""
        if self._node.drain.draining:
            return 0
        limit = max(1, int(self._resources.total.get("CPU", 1) * SPILL_BACKLOG_PER_CPU))
        return max(0, limit - len(self._queue))

    def on_spill(self, origin: str, msg: pb.SpillTask) -> None:
        spec = msg.spec
        verdict = pb.SpillVerdict(task_id=spec.task_id)
        if msg.function_pickled:
            self._functions.setdefault(spec.function_id, msg.function_pickled)
        if spec.task_id in self._tasks:
            verdict.accepted = True   # a re-sent offer we already took
        elif not self._node.membership or not self._node.membership.registered \
                or not self._node.fence.valid():
            verdict.reason = "node is not a registered member right now"
        elif self._node.drain.draining:
            verdict.reason = "node is draining"
        else:
            request = ResourceSet.from_dict(dict(spec.resources))
            if spec.function_id not in self._functions:
                verdict.reason = "function bytes were not shipped"
            else:
                owner = RemoteOwner(origin)
                # Its output goes to the driver's node.
                self._node.log_streams.note_job_origin(spec.job_id.hex(), origin)
                task = TaskRecord.from_spec(spec, owner, self._node._env_key(spec),
                                            return_ids=self._node._return_ids(spec))
                task.remote_args = list(msg.args)
                if not self._node.placement.bind_bundle(task):
                    verdict.reason = "its placement-group bundle is not reserved on this node"
                    self.send(origin, pb.PeerEvent(verdict=verdict))
                    return
                if spec.actor_creation:
                    entry = ActorEntry.from_spec(spec, owner)
                    entry.owner_node = origin
                    task.actor = entry
                # Accept only what we can start now: resources are taken at
                # once, so concurrent offers cannot both be accepted.
                backlog = (task.bundle is None and self._backlog_room() > 0
                           and task.actor is None and self._resources.is_feasible(request))
                dispatch = self._node.dispatch
                instructions = dispatch.machine.handle(
                    m.Offer(task, time.monotonic(), time.time(), backlog))
                if task.state is not TaskState.WAITING:       # started, or queued
                    verdict.accepted = True
                    if task.actor is not None:
                        self._node.hosting.admit(task.actor)
                    self._tasks[spec.task_id] = task
                    dispatch.carry_out(instructions)
                else:
                    verdict.reason = (f"not enough free resources here "
                                      f"({self._resources.available.to_dict()})")
        self.send(origin, pb.PeerEvent(verdict=verdict))

    def on_verdict(self, from_hex: str, msg: pb.SpillVerdict) -> None:
        # Answered, whatever became of the task meanwhile (cancelled, say).
        self.view.answered(from_hex, msg.task_id)
        task = self._tasks.get(msg.task_id)
        if task is None or task.state != "spilled" or task.remote_node != from_hex:
            return
        if msg.accepted:
            return
        log.debug("node %s refused %s: %s", from_hex, task.spec.name, msg.reason)
        self._node.dispatch.handle(m.Refused(task, from_hex))

    def on_result(self, from_hex: str, result: pb.TaskResult) -> None:
        task = self._tasks.get(result.task_id)
        if task is None or task.remote_node != from_hex:
            return
        for value in result.returns:
            if value.contained_ids:
                self._value_from[value.object_id] = from_hex
        if result.stream_item_id:
            self._node.dispatch.handle(m.StreamItem(task.owner.conn_id, result.returns[0]))
            return
        if task.actor is not None:
            self._node.dispatch.handle(m.ActorCreatedElsewhere(
                task, from_hex, result.failed, result.actor_error, result.actor_address))
            if not result.failed:
                self._remote_actors[task.actor.actor_id] = {"node": from_hex, "entry": task.actor}
        if any(v.in_store for v in result.returns):
            self._lineage[task.task_id] = task
        self._node._finish(task, list(result.returns))

    def on_subscribe(self, from_hex: str, msg: pb.Subscribe) -> None:
        log.debug("node %s subscribes to %s (%s)", from_hex, [o.hex() for o in msg.object_ids],
                  [(self._objects.is_ready(o), self._objects.holders_of(o))
                   for o in msg.object_ids])
        self._node.dispatch.handle(m.Subscribe(f"node:{from_hex}", tuple(msg.object_ids)))

    def on_ready(self, from_hex: str, msg: pb.ObjectReady) -> None:
        value = msg.value
        log.debug("node %s sent the value of %s (known here: %s)", from_hex,
                  value.object_id.hex(), value.object_id in self._objects)
        if value.in_store and not value.location:
            value.location = from_hex
        self._node.dispatch.handle(m.ValueArrived(value))

    def on_refs(self, from_hex: str, msg: pb.RefUpdate) -> None:
        self._node.dispatch.handle(m.RefsChanged(f"node:{from_hex}", msg.add, msg.remove,
                                                 claim=True))

    def on_free(self, from_hex: str, msg: pb.FreeObjects) -> None:
        held = tuple(o for o in msg.object_ids if o in self._objects)
        if held:
            self._node.dispatch.handle(m.RefsChanged(f"node:{from_hex}", remove=held))
        for object_id in msg.object_ids:
            if object_id not in held:   # the node we pulled it from freed it (transfer.py)
                self._node.transfer.copy_source_freed(object_id)

    def on_request(self, from_hex: str, msg: pb.Request) -> None:
        async def reply():
            self.send(from_hex, pb.PeerEvent(reply=await answer(
                self._node.routes, RemoteOwner(from_hex), msg, from_peer=True)))
        asyncio.get_running_loop().create_task(reply())

    def on_container_freed(self, from_hex: str, msg: pb.ContainerFreed) -> None:
        self._node.dispatch.handle(m.RefsChanged(container_holder(from_hex, msg.container_id),
                                                 remove=tuple(msg.contained_ids)))

    def on_cancel_remote(self, from_hex: str, msg: pb.CancelTask) -> None:
        task = self._tasks.get(ids.task_id_of(msg.object_id))
        if task is not None and isinstance(task.owner, RemoteOwner):
            self._node._cancel(task, msg.force, msg.recursive)

    def on_reply(self, from_hex: str, msg: pb.Reply) -> None:
        future = self._questions.pop(msg.request_id, None)
        if future is not None and not future.done():
            future.set_result(msg)

    async def ask(self, node_hex: str, method: str, payload: dict, timeout: float = 70.0):
        """A JSON question to another node's daemon (same handlers as local ones)."""
        request_id = next(self._question_ids)
        future = asyncio.get_running_loop().create_future()
        future.node_hex = node_hex
        self._questions[request_id] = future
        if not self.send(node_hex, pb.PeerEvent(request=pb.Request(
                request_id=request_id, method=method, payload=json.dumps(payload).encode()))):
            self._questions.pop(request_id, None)
            raise ConnectionError(f"node {node_hex} is not in this node's cluster view")
        try:
            reply = await asyncio.wait_for(future, timeout)
        finally:
            self._questions.pop(request_id, None)
        if reply.error:
            raise RuntimeError(f"node {node_hex} failed to answer {method}: {reply.error}")
        return json.loads(reply.payload)

    # ------------------------------------------------------------ results home
    def send_home(self, task, values: list) -> None:
        """Results of a task run here for another node go back to that node
        (an actor's creation always, since the owner waits for its fate)."""
        if task.cancelled and task.actor is None:
            return            # its owner cancelled it: it waits for nothing
        origin = task.owner.node_hex
        holder = task.owner.conn_id
        result = pb.TaskResult(task_id=task.task_id)
        for value in values:
            value = self.exportable(value)
            if value.in_store:
                # Our store keeps the bytes until the owner frees them.
                self._node.dispatch.handle(m.Produced((value,), holder=holder))
                self.note_location(value.object_id, True)
            if value.contained_ids:
                # Kept for the owner until it frees the container (ContainerFreed).
                self._node.dispatch.handle(m.RefsChanged(
                    container_holder(origin, value.object_id), add=tuple(value.contained_ids)))
            result.returns.append(value)
        if task.actor is not None and task.actor.state == "ALIVE":
            result.actor_address = task.actor.address
        elif task.actor is not None:
            result.failed = True
            result.actor_error = task.actor.death_cause
        self.send(origin, pb.PeerEvent(result=result))

    def forward_stream_item(self, task, item) -> None:
        """A streamed item of a task run here for another node goes to that node."""
        value = self.exportable(item)
        holder = task.owner.conn_id
        if value.in_store:
            self._node.dispatch.handle(m.Produced((value,), holder=holder))
        self.send(task.owner.node_hex, pb.PeerEvent(result=pb.TaskResult(
            task_id=task.task_id, returns=[value], stream_item_id=item.object_id,
            stream_index=0)))

    # ------------------------------------------------------------ objects
    def send_value(self, holder, value) -> None:
        """A value for `holder`: sent on when it is a peer's holder id ("node:<hex>...")."""
        node_hex = holder_node(holder)
        if node_hex is not None:
            self.send(node_hex, pb.PeerEvent(ready=pb.ObjectReady(value=self.exportable(value))))

    def tell_owners(self, notices: m.TellOwners) -> None:
        """Queue what the state machine says to tell owners; sent by `flush_borrows`."""
        self._notices.append(notices)

    def flush_borrows(self) -> None:
        """Tell owners what this node borrowed, let go of or wants the value of."""
        while self._notices:
            notices, self._notices = self._notices, []
            self._send_notices([o for n in notices for o in n.borrows],
                               [o for n in notices for o in n.unborrows],
                               [o for n in notices for o in n.fetches])

    def _send_notices(self, borrows: list, unborrows: list, fetches: list) -> None:
        log.debug("borrow %d, unborrow %d, fetch %d", len(borrows), len(unborrows), len(fetches))
        by_node: dict[str, pb.RefUpdate] = {}
        for object_id in borrows:
            node = self.view.node_for_prefix(object_id)
            if node is not None:
                by_node.setdefault(node, pb.RefUpdate()).add.append(object_id)
        for object_id in unborrows:
            node = self.view.node_for_prefix(object_id)
            if node is not None:
                by_node.setdefault(node, pb.RefUpdate()).remove.append(object_id)
        for node, update in by_node.items():
            self.send(node, pb.PeerEvent(refs=update))
        for object_id in fetches:
            node = self.view.node_for_prefix(object_id)
            if node is not None:
                self.send(node, pb.PeerEvent(subscribe=pb.Subscribe(object_ids=[object_id])))
            else:
                self._node.dispatch.handle(m.Lost((object_id,), exceptions.ObjectLostError(
                    object_id.hex(), call_site="its owner node is not in the cluster")))

    def free_value(self, value) -> None:
        """A value nobody references any more: drop its bytes wherever they are."""
        if value.in_store:
            location = value.location
            if not location or location == self._node_hex:
                self._store.delete(value.object_id)
                self.note_location(value.object_id, False)
                self._node.transfer.copies_freed(value.object_id)
            else:
                if self._store.contains(value.object_id):   # a pulled copy
                    self._store.delete(value.object_id)
                    self.note_location(value.object_id, False)
                if self._node._owns(value.object_id):
                    self._node.transfer.copies_freed(value.object_id)
                self.send(location, pb.PeerEvent(free=pb.FreeObjects(
                    object_ids=[value.object_id])))
        node = self._value_from.pop(value.object_id, None)
        if node is not None and value.contained_ids:
            self.send(node, pb.PeerEvent(container_freed=pb.ContainerFreed(
                container_id=value.object_id, contained_ids=list(value.contained_ids))))
        self._lineage.pop(ids.task_id_of(value.object_id), None)

    def note_location(self, object_id: bytes, present: bool) -> None:
        """List (or unlist) this node as holding a copy, where other nodes look."""
        if self._node.membership is not None:
            self._node.membership.note_location(object_id, present)

    # ------------------------------------------------------------ node death
    def node_died(self, node_hex: str) -> None:
        """`node_hex` left the view (its lease is gone): undo what it was part of."""
        if not self.view.died(node_hex):
            return
        if self.on_death is not None:
            self.on_death(node_hex)
        log.warning("node %s died (its etcd lease is gone)", node_hex)
        link = self.links.pop(node_hex, None)
        if link is not None:
            asyncio.get_running_loop().create_task(link.close())
        for request_id, future in list(self._questions.items()):
            if getattr(future, "node_hex", None) == node_hex and not future.done():
                future.set_exception(ConnectionError(f"node {node_hex} died"))
        # Work we sent there is retried elsewhere -- after the objects it
        # needs from there are found or being rebuilt (below): placed before,
        # it could take a node's resources while it waits for an argument
        # whose rebuild needs them (a deadlock until the pull gave up).
        after_recovery = []
        for task in list(self._tasks.values()):
            if task.state == "spilled" and task.remote_node == node_hex:
                if self._has_copy_on(task.spec.arg_ref_ids, node_hex):
                    after_recovery.append(task)
                else:
                    self._remote_task_lost(task, node_hex)
            elif isinstance(task.owner, RemoteOwner) and task.owner.node_hex == node_hex:
                if task.worker is None or task.actor is None:
                    # Its worker (if it has one) is killed: nobody waits for it.
                    self._node.dispatch.handle(m.StopRunning(task, "cancelled"))
                else:
                    task.cancelled = True   # an actor's __init__: the actor dies below
                if task.worker is None and task.state != "running":
                    self._drop_task(task)
        # Its borrows and the refs we kept for its containers are released;
        # actors it owned die with it (unless detached); ours it hosted restart.
        self._node.dispatch.handle(m.OwnerNodeDied(node_hex))
        for actor_id, info in list(self._remote_actors.items()):
            if info["node"] == node_hex:
                del self._remote_actors[actor_id]
                self._node.dispatch.handle(m.ActorHostDied(info["entry"], node_hex))
        # Objects whose copy or owner was there: find another copy, rebuild
        # from lineage, or report them lost.
        stranded = []
        for object_id, entry in list(self._objects.entries()):
            value = entry.value
            if value is not None and value.in_store and value.location == node_hex:
                stranded.append(object_id)
            elif value is None and self.view.node_for_prefix(object_id) is None \
                    and not self._node._owns(object_id):
                stranded.append(object_id)     # waiting on an owner that is gone
        # Until the recovery has its verdict, what we own whose copy was there
        # is not ready: a task submitted meanwhile waits for it, rather than
        # being placed to pull a copy that is gone (holding resources the
        # rebuild may need).
        withheld = {}
        for object_id in stranded:
            value = self._objects.get(object_id)
            if value is not None and self._node._owns(object_id):
                withheld[object_id] = value
        if withheld:
            self._node.dispatch.handle(m.Lost(tuple(withheld)))
        if stranded or after_recovery:
            asyncio.get_running_loop().create_task(
                self._recover_objects(node_hex, stranded, after_recovery, withheld))

    def _has_copy_on(self, object_ids, node_hex: str) -> bool:
        """Whether any of `object_ids` has its stored value on `node_hex`."""
        for object_id in object_ids:
            value = self._objects.get(object_id)
            if value is not None and value.in_store and value.location == node_hex:
                return True
        return False

    def confirm_member(self, ins: m.ConfirmMember) -> None:
        """Ask etcd whether `ins.node_hex` is a member (the view does not show it)."""
        asyncio.get_running_loop().create_task(self._confirm_member(ins))

    async def _confirm_member(self, ins: m.ConfirmMember) -> None:
        """MemberAbsent unless etcd has the node's record. A member the view
        has yet to show needs nothing: the view change that shows it places
        the task again. While etcd cannot answer, ask again (the task waits)."""
        membership = self._node.membership
        present = False
        failures = 0
        while membership is not None:
            try:
                present = await asyncio.get_running_loop().run_in_executor(
                    None, membership.is_member, ins.node_hex)
                break
            except Exception as exc:  # noqa: BLE001 - etcd unreachable: the task waits
                failures += 1
                delay = retry_delay(failures)
                log.warning("cannot ask etcd whether node %s is a member (%s: %s); asking "
                            "again in %.1fs", ins.node_hex, type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
                if ins.task.state != TaskState.INFEASIBLE:
                    return        # placed again (or ended) meanwhile
        if not present:
            self._node.dispatch.handle(m.MemberAbsent(ins.task, ins.node_hex, ins.reason))

    async def _recover_objects(self, node_hex: str, object_ids: list, tasks: list,
                               withheld: dict) -> None:
        """Find each object another copy, rebuild it, or report it lost; then
        retry `tasks` (spilled to `node_hex`, needing some of them).
        `withheld`: the values of those made not ready until then."""
        try:
            await self._recover_each(node_hex, object_ids, withheld)
        except Exception:  # noqa: BLE001 - logged; the tasks are retried all the same
            log.exception("recovering the objects node %s held failed", node_hex)
        finally:
            for task in tasks:
                if task.state == "spilled" and task.remote_node == node_hex:
                    self._remote_task_lost(task, node_hex)

    async def _recover_each(self, node_hex: str, object_ids: list, withheld: dict) -> None:
        for object_id in object_ids:
            before = withheld.get(object_id)
            if self._store.contains(object_id):
                self._use_copy(object_id, "", before)
                continue
            copies = []
            if self._node.membership is not None:
                try:
                    copies = await asyncio.get_running_loop().run_in_executor(
                        None, self._node.membership.locations, object_id)
                except Exception as exc:  # noqa: BLE001 - treat as no copy
                    log.warning("could not list copies of %s: %s", object_id.hex(), exc)
            alive = [n for n in copies if n in self.view.nodes and n != node_hex]
            if alive:
                self._use_copy(object_id, alive[0], before)
            elif self._node._owns(object_id):
                self.object_copy_lost(object_id, node_hex, withheld=before is not None)
            elif self.view.node_for_prefix(object_id) is not None and getattr(
                    self._objects.get(object_id), "in_store", False):   # a copy's bytes
                # Its owner lives and rebuilds it; a reader that needs the
                # bytes asks the owner for the new copy (transfer.py).
                continue
            else:
                error = exceptions.OwnerDiedError(
                    object_id.hex(), call_site=f"its owner node {node_hex} died and no other "
                    "node holds a copy")
                self._node.dispatch.handle(m.Lost((object_id,), error))

    def _use_copy(self, object_id: bytes, node_hex: str, withheld=None) -> None:
        """Point the entry at a surviving copy (here when node_hex is empty);
        a `withheld` value is made ready again, pointing there."""
        old = self._objects.get(object_id)
        value = pb.ObjectValue(object_id=object_id, in_store=True, location=node_hex)
        if old is not None:
            value.CopyFrom(old)
            value.location = node_hex
            self._node.dispatch.handle(m.CopyMoved(value))
        else:
            if withheld is not None:       # (made not ready at the death: no value now)
                value.CopyFrom(withheld)
                value.location = node_hex
            self._node.dispatch.handle(m.Produced((value,)))

    def _drop_task(self, task) -> None:
        self._node.dispatch.handle(m.Release(task))
        self._node._move(task, TaskState.DONE, "dropped: its owner's node died")
        self._tasks.pop(task.task_id, None)

    def _remote_task_lost(self, task, node_hex: str) -> None:
        if task.actor is not None:
            self._node.dispatch.handle(m.ActorHostDied(task.actor, node_hex))
            return
        if retry_or_fail(task) == RETRY:
            self._node._move(task, TaskState.WAITING, f"retry: node {node_hex} running it died")
            task.refused_by = {node_hex}
            log.info("retrying %s: its node %s died", task.spec.name, node_hex)
            self._node.dispatch.handle(m.PlaceWhenArgsReady(task))
        elif task.cancelled:
            self._node._fail(task, exceptions.TaskCancelledError(task.task_id.hex()))
        else:
            self._node._fail(task, exceptions.WorkerCrashedError(
                f"Task {task.spec.name} (id {task.task_id.hex()}) was running on node "
                f"{node_hex}, which died; no retries left (max_retries={task.spec.max_retries})."))

    def object_copy_lost(self, object_id: bytes, node_hex: str, withheld: bool = False) -> None:
        """The only copy of an object we own was on `node_hex`: rebuild it from
        lineage, or set the error saying why it cannot be. `withheld`: its
        value was already made not ready (node_died) until this verdict."""
        task = self._lineage.get(ids.task_id_of(object_id))
        if withheld:
            if self._objects.is_ready(object_id) or object_id not in self._objects:
                return        # its value came back meanwhile, or it was freed
        elif not self._objects.is_ready(object_id):
            return            # not here, or already waiting for its value again
        if task is not None and task.actor is None and retry_or_fail(task) == RETRY:
            # Lineage: run the producing task again; its other outputs are rebuilt too.
            del self._lineage[task.task_id]
            self._node._move(task, TaskState.WAITING,
                             f"re-run from lineage: a copy on node {node_hex} was lost")
            task.refused_by = {node_hex}
            # Its other outputs wait for the new run too.
            self._node.dispatch.handle(m.Lost(
                tuple(task.return_ids) if object_id in task.return_ids
                else (object_id, *task.return_ids),
                pin=(*task.spec.arg_ref_ids, *task.spec.contained_ids)))
            self._tasks[task.task_id] = task
            log.info("rebuilding %s from lineage (node %s died)", object_id.hex(), node_hex)
            self.place_or_queue(task)
            return
        reason = ("no retries left to rebuild it" if task is not None else
                  "it cannot be rebuilt (a put object, or its lineage was released)")
        self._node.dispatch.handle(m.Lost((object_id,), exceptions.ObjectReconstructionFailedError(
            object_id.hex(), call_site=f"its only copy was on node {node_hex}, which died; {reason}")))

