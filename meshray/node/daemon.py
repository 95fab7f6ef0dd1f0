"""The node daemon: one per node, a peer among peers.

It serves the session streams of local drivers and workers, keeps the node's
object directory and shared-memory store, queues and dispatches tasks onto
its worker pool, and (through meshray.node.membership) holds the node's etcd
lease. Everything runs on one asyncio loop, so the state below needs no locks;
its decisions are made by the pure node state machine (node.state) and the
pure modules it and the peer duties use (scheduler.policy, node.objects,
node.tasks).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from dataclasses import dataclass, field

from meshray import exceptions
from meshray.common import arg_dir, ids
from meshray.common.fence import LeaseFence
from meshray.node.actor_hosting import ActorHosting
from meshray.node.actors import ActorEntry
from meshray.node.cluster import PeerDuties, RemoteOwner
from meshray.node.dispatch import TaskDispatch
from meshray.node.lease_service import LeaseService
from meshray.node.draining import Drain
from meshray.node.env_setup import EnvSetup, parse_task_env
from meshray.node.event_log import EventLog
from meshray.node.dashboard import Dashboard
from meshray.node.health import health_routes
from meshray.node.http_api import HttpApi
from meshray.node.job_api import JobApi
from meshray.node.liveness import PeerLiveness
from meshray.node.metrics import NodeMetrics
from meshray.node.log_files import LOGS_DIR, LogWriter
from meshray.node.log_service import log_service_for
from meshray.node.log_stream import LogStreams
from meshray.node.memory_monitor import MemoryMonitor
from meshray.node.node_store import open_node_store
from meshray.node import request_rules
from meshray.node.objects import ObjectDirectory, error_value
from meshray.node.placement_groups import PlacementDuties
from meshray.node.routes import answer, node_routes
from meshray.node.session import DEFAULT_ENV_KEY, MAX_EVENTS_PER_BATCH, Connection, env_key_for
from meshray.node.state import messages as m
from meshray.node.task_lifecycle import TaskState, move
from meshray.node import state_records
from meshray.node.task_events import TaskEvents
from meshray.node.tasks import TaskQueue, TaskRecord
from meshray.node.transfer import ObjectTransfer
from meshray.node.worker_pool import (
    WorkerPool,
    WorkerProcess,
    describe_exit,
    wait_for_exit,
)
from meshray.rpc import accept_targets, call_link, make_aio_server, strict
from meshray.rpc.call_link import LinkClosed, status_payload
from meshray.rpc.session_link import SESSION_METHOD, SessionServer, session_address
from meshray.rpc.generated import meshray_pb2 as pb
from meshray.rpc.generated import meshray_pb2_grpc as pb_grpc
from meshray.scheduler.resources import NodeResources, ResourceSet

__all__ = ["NodeConfig", "NodeDaemon"]

log = logging.getLogger(__name__)

# Loop turns a gRPC aio unary call takes from its caller to its request on
# the wire: the link's send loop, the call's own task, the client
# interceptor's (membership proof). Four are needed on a connected link
# (tests/unit/test_client_batch_cut.py fails with two, passes with four);
# two more for margin cost ~20 us, and only where a batch is cut.
TURNS_TO_START_A_DELIVERY = 6

# How long a task whose worker died waits for the worker's exit status (its
# stream closes a moment before the status exists) before reporting it.
WORKER_EXIT_WAIT_S = 2.0
# Per-node services beside the node's duties: the HTTP API, the Prometheus
# endpoint, the memory monitor and the worker log files.
EXTRAS = ("http", "metrics", "memory_monitor", "log_files", "data_link")


@dataclass
class NodeConfig:
    session_dir: str
    node_id: bytes
    resources: dict                       # total resources, e.g. {"CPU": 2.0}
    object_store_memory: int
    host: str = "127.0.0.1"
    port: int = 0
    advertise_host: str = ""          # what peers dial; default derived from host
    token: str | None = None
    etcd_endpoints: list = field(default_factory=list)
    labels: dict = field(default_factory=dict)
    prestart_workers: int | None = None
    gpu_ids: list = field(default_factory=list)   # device ids behind the GPU resource
    metrics_export_port: int = 0      # Prometheus endpoint (0: a free port)
    dashboard_port: int | None = None  # HTTP API (None: 8265, or a free port when taken)
    data_port: int = 0                # data link for large objects' bytes (0: a free port)
    extras: frozenset = frozenset(EXTRAS)  # per-node services to run (a simulation drops them)


class NodeDaemon(pb_grpc.NodeServiceServicer, pb_grpc.NodePeerServicer):
    def __init__(self, config: NodeConfig):
        self.config = config
        self.node_id = config.node_id
        self.node_hex = config.node_id.hex()
        self.resources = NodeResources(
            ResourceSet.from_dict(config.resources),
            instances={"GPU": list(config.gpu_ids)} if config.gpu_ids else None)
        self.store = open_node_store(config.node_id, config.session_dir,
                                     config.object_store_memory)
        self.store.mapped = self._store_file_mapped
        self.store_dir = self.store.shm_dir
        self.objects = ObjectDirectory(is_local=self._owns)
        self.task_events = TaskEvents(config.node_id.hex(), os.path.join(
            config.session_dir, "task_events", config.node_id.hex()[:12]),
            live_tasks=lambda: list(self.tasks.values()))
        self.events = EventLog()
        self.metrics = NodeMetrics(self, config.metrics_export_port)   # node/metrics.py
        self.task_events.on_end = self.metrics.task_ended
        self.queue = TaskQueue(self.events)
        self.tasks: dict[bytes, TaskRecord] = {}
        self.functions: dict[bytes, bytes] = {}
        self.conns: dict[int, Connection] = {}
        self._sent_to: dict[int, Connection] = {}    # given events since the last write
        self._conn_ids = itertools.count(1)
        self.pool: WorkerPool | None = None
        self.server = None
        self.sessions: SessionServer | None = None
        self.data_server = None
        self.address = ""
        self.local_address = ""
        self.membership = None            # set by the process entry point
        self.actors: dict[bytes, ActorEntry] = {}
        self._crash_reports: set = set()     # _report_crash tasks, held until they finish
        self._stopping = asyncio.Event()
        self.peers = PeerDuties(self)
        self.hosting = ActorHosting(self)
        self.drain = Drain(self)
        self.placement = PlacementDuties(self)
        self.leases = LeaseService(self)           # worker leases: questions and their verdicts
        self.dispatch = TaskDispatch(self)         # the node state machine's shell
        self.transfer = ObjectTransfer(self)
        self.log_streams = LogStreams(self.node_hex, self.conns, self.peers.send,
                                      self._advertised_host)
        self.state = state_records.state_service_for(self)
        self.log_writer = LogWriter(os.path.join(config.session_dir, LOGS_DIR))
        self.logs = log_service_for(self)
        self.http = HttpApi(self, config.dashboard_port)     # node/http_api.py
        self.jobs = JobApi(self)                              # node/job_api.py
        self.envs = EnvSetup(pool=lambda: self.pool, object_bytes=self.transfer.object_bytes,
                             uploaded_bytes=self.jobs.package_bytes, log_writer=self.log_writer,
                             log_streams=self.log_streams, setup_ended=self._env_setup_ended)
        self.http.add_routes(self.jobs.routes() + Dashboard(self).routes())  # node/dashboard.py
        self.http.add_routes(health_routes(self))            # node/health.py: public probes
        self.routes = node_routes(self)
        self.memory_monitor = MemoryMonitor(self)     # node/memory_monitor.py

    def _cluster_asker(self, method: str):
        async def ask(conn, payload: dict):
            # Cluster questions may wait on etcd: never on the event loop.
            local = self.resources.available.to_dict()
            return await asyncio.get_running_loop().run_in_executor(
                None, self._answer_cluster, method, local)
        return ask

    def _owns(self, object_id: bytes) -> bool:
        return object_id[:ids.NODE_PREFIX_LEN] == self.node_id[:ids.NODE_PREFIX_LEN]

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.fence = LeaseFence.create(
            os.path.join(self.config.session_dir, f"lease-{self.node_id.hex()[:8]}.fence"))
        unix_path = session_address(self.config.session_dir, self.node_id)[len("unix:"):]
        self.server, bound = make_aio_server(
            [f"{self.config.host}:{self.config.port}"], token=self.config.token)
        self._serve(self.server)
        # Local processes' sessions (rpc/session_link.py).
        self.sessions = SessionServer(unix_path, token=self.config.token,
                                      on_link=self._session)
        self.transfer.start()   # pulled copies, allocator
        await self.server.start()
        await self.sessions.start()
        self.address = f"{self._advertised_host()}:{bound[0].rsplit(':', 1)[1]}"
        accept_targets(self.server, [self.address])   # peers dial what we advertise
        extras = self.config.extras
        if "data_link" in extras:        # large objects' bytes (rpc/data_link.py)
            self.data_server = self.transfer.serve_data(self.config.host, self.config.data_port,
                                                        self.config.token)
            self.data_server.accept_hosts([self._advertised_host()])
        if "metrics" in extras:
            self.metrics.start(asyncio.get_running_loop())
        if "http" in extras:
            self.http.start(asyncio.get_running_loop())
            self.jobs.start(self.http)
        self.local_address = self.sessions.address
        self.pool = self._make_pool(
            daemon_address=self.local_address, token=self.config.token,
            session_dir=self.config.session_dir, on_output=self.log_streams.worker_output,
            node_host=self.config.host, advertise_host=self._advertised_host(),
            fence_path=self.fence.path, log_writer=self.log_writer if "log_files" in extras else None)
        self.pool.on_forget = lambda worker: worker.resolved_env.release(self.envs.cache)
        self.dispatch.attach_pool(self.pool)
        count = self.config.prestart_workers
        if count is None:
            count = int(self.config.resources.get("CPU", 0))
        for _ in range(count):
            self.pool.start(ids.new_id(), DEFAULT_ENV_KEY, {})
        asyncio.get_running_loop().create_task(self._reap_loop())
        if "log_files" in extras:
            asyncio.get_running_loop().create_task(self.log_writer.run(self._stopping))
        asyncio.get_running_loop().create_task(self.peers.run(self._stopping))
        if "memory_monitor" in extras:
            asyncio.get_running_loop().create_task(self.memory_monitor.run(self._stopping))
        liveness = PeerLiveness(self.peers, self._revoke_dead_peer)
        asyncio.get_running_loop().create_task(liveness.run(self._stopping))

    def _make_pool(self, **options) -> WorkerPool:
        """Where tasks run: worker processes (a hollow node simulates them: node/hollow.py)."""
        return WorkerPool(**options)

    def _serve(self, server) -> None:
        """Register both services; a malformed request never reaches a handler
        (rpc/strict.py answers it INVALID_ARGUMENT, node/request_rules.py says
        what is malformed). Sessions come on session links (_session)."""
        local, questions = frozenset(self.routes.questions), self.routes.peer_questions
        refused = self._malformed_log = strict.MalformedLog()
        self._check_client_batch = lambda batch: request_rules.check_client_batch(batch, local)
        strict.add_service(server, self, "meshray.NodeService", malformed_log=refused)
        # PullObject yields chunks encoded by hand (transfer.encode_chunk).
        strict.add_service(server, self, "meshray.NodePeer", malformed_log=refused,
                           raw_responses=("PullObject",), checks={
                               "Deliver": lambda batch: request_rules.check_peer_batch(
                                   batch, questions),
                               "PullObject": request_rules.check_pull_request})

    def _advertised_host(self) -> str:
        if self.config.advertise_host:
            return self.config.advertise_host
        if self.config.host in ("0.0.0.0", "::", ""):
            import socket
            try:
                return socket.gethostbyname(socket.gethostname())
            except OSError:
                return "127.0.0.1"
        return self.config.host

    async def wait_stopped(self) -> None:
        await self._stopping.wait()

    def request_stop(self) -> None:
        self._stopping.set()

    def _store_file_mapped(self, path: str) -> bool:
        """Does any process of this node map `path`? (Only then may the store reuse it.)"""
        pids = {os.getpid()} | {conn.pid for conn in self.conns.values() if conn.pid}
        if self.pool is not None:
            pids |= {worker.pid for worker in self.pool.by_id.values()}
        for pid in pids:
            try:
                with open(f"/proc/{pid}/maps") as maps:
                    if path in maps.read():
                        return True
            except FileNotFoundError:
                continue                  # exited: maps nothing
            except OSError:
                return True               # cannot tell: assume it does
        return False

    def _revoke_dead_peer(self, node_hex: str, lease_id: int) -> None:
        """End a dead peer's membership now (liveness.py proved its process gone)."""
        if self.membership is not None:
            self.membership.coordinator.revoke_lease(lease_id, timeout=3.0)

    async def _coordinator(self):
        """etcd's client once this node is a registered member; None when it is not one."""
        if self.membership is None:
            return None
        registered = await asyncio.get_running_loop().run_in_executor(
            None, self.membership.wait_registered, 15.0)
        return self.membership.coordinator if registered else None

    async def stop(self) -> None:
        for conn in list(self.conns.values()):
            conn.closed = True
            conn.end()
        if self.pool is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.pool.stop_all)
        await self.log_writer.aclose()
        self.logs.close()
        if self.sessions is not None:
            await self.sessions.close()
        if self.server is not None:
            await self.server.stop(grace=0.5)
        if self.data_server is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.data_server.close)
        await asyncio.get_running_loop().run_in_executor(None, self.metrics.stop)
        self.jobs.stop()
        await asyncio.get_running_loop().run_in_executor(None, self.http.stop)
        self.store.destroy()
        self.task_events.close()
        self.fence.close()
        try:
            os.unlink(self.fence.path)
        except OSError:
            pass

    # ------------------------------------------------------------ rpc
    async def Deliver(self, request, context):
        """A peer's batch of events (see PeerDuties.deliver)."""
        try:
            return self.peers.deliver(request)
        finally:
            self._write_sent()       # results of spilled work, to their drivers now

    async def PullObject(self, request, context):
        """A peer pulls an object's bytes from here (see ObjectTransfer.serve_pull)."""
        async for chunk in self.transfer.serve_pull(request, context):
            yield chunk

    async def GetNodeInfo(self, request, context):
        return pb.NodeInfoReply(node_id=self.node_id, address=self.address,
                                etcd_endpoints=",".join(self.config.etcd_endpoints),
                                session_dir=self.config.session_dir, pid=os.getpid())

    async def _session(self, link) -> None:
        """One process's session (rpc/session_link.py): its batches are read
        and handled by _read_client, our events go back in batches."""
        conn = Connection(next(self._conn_ids), asyncio.Queue())
        conn.write_now = lambda events: link.write(
            call_link.REPLIES, pb.ServerBatch(events=events).SerializeToString())
        conn.congested = link.congested
        conn.on_send = self._note_send
        self.conns[conn.conn_id] = conn
        reader = asyncio.get_running_loop().create_task(
            self._read_client(conn, self._client_batches(link, conn)))
        status = status_payload(call_link.OK)
        try:
            while True:
                event = await conn.next_event()
                if event is None:
                    break
                events = [event]
                while not conn.outbox.empty() and len(events) < MAX_EVENTS_PER_BATCH:
                    event = conn.outbox.get_nowait()
                    if event is None:
                        conn.closed = True
                        break
                    events.append(event)
                if conn.drop_reply:
                    conn.ended = (call_link.UNAVAILABLE, "failpoint node.connect: dropped a reply")
                    break
                conn.write_now(events)
                await link.drain()
                if conn.closed:
                    break
            if conn.malformed is not None:
                status = status_payload(call_link.MALFORMED,
                                        f"malformed request to {SESSION_METHOD}: {conn.malformed}")
            elif conn.ended is not None:
                status = status_payload(*conn.ended)
            await link.finish(call_link.STATUS, status)
        except LinkClosed as exc:
            log.debug("connection %d ended: %s", conn.conn_id, exc)
        finally:
            reader.cancel()
            self._disconnected(conn)

    async def _client_batches(self, link, conn: Connection):
        """The process's batches, each decoded and checked whole (strict.py)."""
        while True:
            try:
                kind, payload = await link.recv()
            except LinkClosed as exc:
                log.debug("connection %d: %s", conn.conn_id, exc)
                return
            fired = await self.sessions.roll()
            if fired and fired[0] == "drop":
                conn.ended = (call_link.UNAVAILABLE,
                              "failpoint node.connect: dropped a request message")
                return
            if fired:
                conn.drop_reply = True
            if kind == call_link.END:
                return
            try:
                batch = call_link.decode_calls(kind, payload, pb.ClientBatch,
                                               self._check_client_batch)
            except strict.Malformed as exc:
                self._malformed_log.record(SESSION_METHOD, link.peer, str(exc))
                raise
            yield batch

    async def _read_client(self, conn: Connection, request_iterator) -> None:
        """Handle each batch's events in order. Where an event leaves a peer
        delivery waiting to start (work offered to a peer) and more events
        follow, the batch is cut there as if the process had sent two: the
        batch's end work runs and the loop turns until the delivery is on
        its way (TURNS_TO_START_A_DELIVERY), so the peer starts the work
        while the rest is handled. Measured: a burst of 60 submissions held
        a peer's first task back by the ~6 ms the whole burst took here
        (peer's first start 7.8 ms after the burst began; 3.0 ms cut)."""
        peers = self.peers
        try:
            async for batch in request_iterator:
                events = batch.events
                last = len(events) - 1
                due = peers.deliveries_due
                for index, event in enumerate(events):
                    try:
                        self._handle(conn, event)
                    except strict.Malformed:
                        self._batch_done()   # what came before the refusal takes effect
                        raise
                    except Exception:  # noqa: BLE001 - one bad event never takes the node down
                        log.exception("failed to handle %s from connection %d",
                                      event.WhichOneof("kind"), conn.conn_id)
                    if index == last:
                        self._batch_done()
                    elif peers.deliveries_due != due:
                        self._batch_done()
                        for _ in range(TURNS_TO_START_A_DELIVERY):
                            await asyncio.sleep(0)
                        due = peers.deliveries_due
        except asyncio.CancelledError:
            raise
        except strict.Malformed as exc:
            conn.malformed = exc      # Connect ends the session with INVALID_ARGUMENT
        except Exception as exc:  # noqa: BLE001
            log.debug("connection %d read ended: %s", conn.conn_id, exc)
        conn.end()

    def _batch_done(self) -> None:
        """What ends a client batch: borrows told to owners, queued work
        started, and what that gave each process written to it now."""
        self.peers.flush_borrows()
        self.dispatch.schedule()
        self._write_sent()

    def _note_send(self, conn: Connection) -> None:
        self._sent_to[conn.conn_id] = conn

    def _write_sent(self) -> None:
        """Write the events handling gave each process from here, where its
        session's writer is parked (Connection.flush_now): a sync task's
        dispatch and its result then skip a turn of the loop each."""
        sent, self._sent_to = self._sent_to, {}
        for conn in sent.values():
            try:
                conn.flush_now()
            except Exception:  # noqa: BLE001 - the session's writer still has them
                log.exception("writing to connection %d failed", conn.conn_id)

    def _handle(self, conn: Connection, event: pb.ClientEvent) -> None:
        kind = event.WhichOneof("kind")
        self.routes.client[kind](conn, getattr(event, kind))

    # ------------------------------------------------------------ handlers
    def _on_hello(self, conn: Connection, hello: pb.Hello) -> None:
        conn.role, conn.worker_id, conn.pid = hello.role, hello.worker_id, hello.pid
        conn.job_id, conn.namespace, conn.log_to_driver = hello.job_id, hello.namespace, hello.log_to_driver
        if hello.role == "worker":
            worker = self.pool.by_id.get(hello.worker_id)
            if worker is None or worker.conn is not None:
                raise strict.Malformed(
                    f"hello.worker_id={hello.worker_id.hex()}: expected the id of a worker "
                    "this node started and that has not connected yet")
            worker.conn, conn.worker = conn, worker
            worker.call_address = hello.call_address
            self.pool.connected(worker)
            self.dispatch.handle(m.WorkerReady(worker, time.monotonic(), time.time()))
        conn.send(pb.ServerEvent(welcome=pb.Welcome(
            node_id=self.node_id, store_dir=self.store_dir,
            session_dir=self.config.session_dir, node_address=self.address, job_id=conn.job_id)))

    def _on_register_function(self, conn: Connection, msg: pb.RegisterFunction) -> None:
        self.functions.setdefault(msg.function_id, msg.pickled)

    def _on_submit(self, conn: Connection, msg: pb.SubmitTask) -> None:
        spec = msg.spec
        return_ids = self._return_ids(spec)
        task = TaskRecord.from_spec(spec, conn, self._env_key(spec), return_ids=return_ids)
        if spec.actor_creation:
            task.actor = self.hosting.admit(ActorEntry.from_spec(spec, conn))
        self.tasks[spec.task_id] = task
        parent = self.tasks.get(spec.parent_task_id)
        if parent is not None:
            parent.children.add(spec.task_id)
        self.dispatch.handle(m.Submitted(task))

    @staticmethod
    def _return_ids(spec) -> list:
        return ids.return_ids_of(spec.task_id, spec.num_returns)

    def _on_put(self, conn: Connection, msg: pb.PutObject) -> None:
        value = msg.value
        conn.reserved.discard(value.object_id)
        self._seal_if_stored(value)
        if value.in_store and value.location not in ("", self.node_hex) and not msg.handoff:
            # An actor on another node holds this return for us until we claim it.
            self.peers.send(value.location, pb.PeerEvent(refs=pb.RefUpdate(add=[value.object_id])))
        self.dispatch.handle(m.Put(conn.conn_id, value, msg.handoff))

    def _on_reserve(self, conn: Connection, msg: pb.ReserveObject) -> None:
        try:
            # The client writes with layout.write_object, which takes a recycled file.
            path = self.store.reserve(msg.object_id, msg.size, recycled=True)
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            conn.send(pb.ServerEvent(reserve_reply=pb.ReserveReply(
                request_id=msg.request_id, error=str(exc))))
            return
        conn.reserved.add(msg.object_id)
        conn.send(pb.ServerEvent(reserve_reply=pb.ReserveReply(request_id=msg.request_id, path=path)))

    def _on_subscribe(self, conn: Connection, msg: pb.Subscribe) -> None:
        self.dispatch.handle(m.Subscribe(conn.conn_id, tuple(msg.object_ids)))

    def _on_refs(self, conn: Connection, msg: pb.RefUpdate) -> None:
        self.dispatch.handle(m.RefsChanged(conn.conn_id, msg.add, msg.remove))

    def _on_blocked(self, conn: Connection, msg: pb.WorkerBlocked) -> None:
        if conn.worker is not None:
            self.dispatch.handle(m.Blocked(conn.worker, msg.blocked))

    def _env_key(self, spec) -> str:
        env, _packages = parse_task_env(spec)
        if env:
            from meshray.runtime_env import runtime_env_key
            return runtime_env_key(env)
        return env_key_for(dict(spec.env_vars))

    def _on_cancel(self, conn: Connection, msg: pb.CancelTask) -> None:
        task_id = ids.task_id_of(msg.object_id)
        task = self.tasks.get(task_id)
        if task is not None:
            self._cancel(task, msg.force, msg.recursive)
        elif msg.recursive:
            # A task pushed on a lease (this node never had it): the tasks it
            # submitted did come here.
            for child in [t for t in self.tasks.values() if t.spec.parent_task_id == task_id]:
                self._cancel(child, msg.force, True)

    def _on_request(self, conn: Connection, msg: pb.Request) -> None:
        asyncio.get_running_loop().create_task(self._answer_request(conn, msg))

    async def _answer_request(self, conn: Connection, msg: pb.Request) -> None:
        conn.send(pb.ServerEvent(reply=await answer(self.routes, conn, msg)))

    def _on_task_result(self, conn: Connection, result: pb.TaskResult) -> None:
        for value in result.returns:
            conn.reserved.discard(value.object_id)
        worker = conn.worker
        task = self.tasks.get(result.task_id)
        if task is None or worker is None or task.worker is not worker:
            return
        if result.stream_item_id and isinstance(task.owner, RemoteOwner):
            self._seal_if_stored(result.returns[0])
            self.peers.forward_stream_item(task, result.returns[0])
            return
        if result.stream_item_id:
            item = result.returns[0]
            self._seal_if_stored(item)
            self.dispatch.handle(m.StreamItem(task.owner.conn_id, item))
            return
        if task.actor is not None:
            self.dispatch.handle(m.ActorCreated(task, worker, result.failed, result.actor_error,
                                                result.actor_address, result.returns))
            return
        self.dispatch.handle(m.TaskReturned(
            worker, task, result.returns, result.failed and result.retryable_error,
            time.monotonic(), time.time()))

    # ------------------------------------------------------------ lifecycles
    def _move(self, task: TaskRecord, new: TaskState, cause: str) -> None:
        """Every task move on this node: checked by the table, kept in the event log."""
        move(task, new, cause, self.events)

    async def _ask_flush_output(self, conn, payload: dict) -> dict:
        """Pass on what the workers' pipes hold now. A driver asks before it
        leaves: a worker flushes its output before it reports a result, so the
        last lines a finished task printed are in a pipe by then, and they
        reach the driver ahead of this answer (one ordered stream)."""
        if self.pool is not None:
            for worker in list(self.pool.by_id.values()):
                self.pool.drain_output(worker)
        return {}

    async def _ask_dump_events(self, conn, payload: dict) -> dict:
        """The node's event log (the last `last` entries, all when absent)."""
        last = payload.get("last")
        if last is not None and (isinstance(last, bool) or not isinstance(last, int) or last < 0):
            raise ValueError(f"last={last!r} must be a whole number >= 0")
        return {"node_id": self.node_id.hex(), "capacity": self.events.capacity,
                "recorded": self.events.recorded, "events": self.events.tail(last)}

    def _finish(self, task: TaskRecord, values: list, error: BaseException | None = None) -> None:
        """`task` is done: `values` are its returns (`error`: the failure the node decided)."""
        failed = any(v.is_error for v in values)
        self._move(task, TaskState.DONE, "finished with an error" if failed else "finished")
        self.task_events.finished(task, failed, error)
        self.tasks.pop(task.task_id, None)
        for value in values:
            self._seal_if_stored(value)
        if isinstance(task.owner, RemoteOwner):
            self.peers.send_home(task, values)
            return
        spec = task.spec
        self.dispatch.handle(m.Produced(
            tuple(values), unpin=(*spec.arg_ref_ids, *spec.contained_ids)))

    def _finish_failed(self, task: TaskRecord, error: BaseException) -> None:
        """Fail a task whose resources are already released."""
        self._finish(task, [error_value(oid, error) for oid in task.return_ids], error)

    def _fail(self, task: TaskRecord, error: BaseException) -> None:
        self.dispatch.handle(m.Fail(task, error))

    def _cancel(self, task: TaskRecord, force: bool, recursive: bool) -> None:
        if recursive:
            for child_id in list(task.children):
                child = self.tasks.get(child_id)
                if child is not None:
                    self._cancel(child, force, recursive)
        self.dispatch.handle(m.Cancel(task, force, recursive))

    # ------------------------------------------------------------ objects
    def _seal_if_stored(self, value: pb.ObjectValue) -> None:
        """Seal a store value a local process just wrote (not copies elsewhere)."""
        if value.in_store and value.location in ("", self.node_hex) \
                and not self.objects.is_ready(value.object_id):
            self.store.seal(value.object_id, value.size)

    def deliver(self, holder, value: pb.ObjectValue) -> None:
        """Send `value` to `holder`: a local process, or a peer's holder id."""
        conn = self.conns.get(holder)
        if conn is not None:
            conn.send(pb.ServerEvent(ready=pb.ObjectReady(value=value)))
        else:
            self.peers.send_value(holder, value)

    # ------------------------------------------------------------ failures
    def _disconnected(self, conn: Connection) -> None:
        log.debug("connection %d (%s pid %d) closed", conn.conn_id, conn.role, conn.pid)
        conn.closed = True
        self.conns.pop(conn.conn_id, None)
        self._abort_reservations(conn)
        if conn.pid:
            # Actor-call argument files this process can no longer release.
            arg_dir.sweep_process(self.store_dir, conn.pid, conn.worker_id)
        self.dispatch.handle(m.OwnerLeft(conn))       # what it held goes too
        worker = conn.worker
        if worker is not None:
            self._worker_lost(worker)
        elif conn.role == "driver":
            self._job_ended(conn)
        self.dispatch.schedule()

    def _abort_reservations(self, conn: Connection) -> None:
        """Give back the room a process reserved and never sealed: nothing else will."""
        for object_id in conn.reserved:
            try:
                self.store.abort(object_id)
            except Exception:  # noqa: BLE001 - sealed meanwhile (a result on its way), or gone
                continue
        conn.reserved.clear()

    def _worker_lost(self, worker: WorkerProcess) -> None:
        self.pool.forget(worker)
        task = worker.current_task
        owner_present = task is not None and self._owner_present(task.owner)
        group_gone = task is not None and task.pg_dropped \
            and self.placement.known_gone(task.pg_hex)
        if worker.pipeline and worker.actor is None:
            log.info("worker %d died with %d pipelined task(s) queued; placing them again",
                     worker.pid, len(worker.pipeline))
        attempt = task.spec.attempt if task is not None else 0
        if worker.actor is not None or worker.leased_task is not None:
            self.task_events.worker_gone(worker.worker_id)
        self.dispatch.handle(m.WorkerLost(worker, owner_present, group_gone))
        if task is not None and task.actor is None and task.spec.attempt != attempt:
            log.info("worker %d died running %s; retrying (%s retries left)",
                     worker.pid, task.spec.name, task.retries_left)

    def report_crash(self, task: TaskRecord, worker: WorkerProcess) -> None:
        """Fail `task` once `worker`'s exit status is in (so the error can name it)."""
        report = asyncio.get_running_loop().create_task(self._report_crash(task, worker))
        self._crash_reports.add(report)
        report.add_done_callback(self._crash_reports.discard)

    async def _report_crash(self, task: TaskRecord, worker: WorkerProcess) -> None:
        code = await wait_for_exit(worker.process, WORKER_EXIT_WAIT_S)
        if code is None:
            self.pool.kill(worker)
        if task.cancelled:
            error = task.pg_error or exceptions.TaskCancelledError(task.task_id.hex())
        else:
            error = worker.kill_error or exceptions.WorkerCrashedError(
                f"The worker (pid {worker.pid}) running task {task.spec.name} died: "
                f"{describe_exit(code)}; no retries left (max_retries="
                f"{task.spec.max_retries}).",
                task_id=task.task_id, worker_id=worker.worker_id, node_id=self.node_id)
        self._finish_failed(task, error)

    def _env_setup_ended(self, worker_key: str, error: BaseException | None) -> None:
        """A runtime env's setup ended: on failure the tasks waiting for its workers fail."""
        if error is not None:
            self.dispatch.handle(m.EnvSetupFailed(worker_key, error))
        self.dispatch.schedule()

    def _owner_present(self, owner) -> bool:
        """Whether a retry's result would still reach the task's owner."""
        if isinstance(owner, RemoteOwner):
            return owner.node_hex not in self.peers.view.known_dead
        return owner.conn_id in self.conns

    def _job_ended(self, driver: Connection) -> None:
        """A driver left: drop its queued work and stop workers running it."""
        self.placement.remove_job_groups(driver.job_id)
        for task in list(self.tasks.values()):
            if task.spec.job_id != driver.job_id:
                continue
            if task.actor is not None and task.actor.detached:
                continue              # a detached actor outlives its creator, __init__ too
            if task.state == "running" and task.worker is not None:
                self.dispatch.handle(m.StopRunning(task, "cancelled"))
            elif task.state in ("queued", "waiting", "assigned") and task.actor is None:
                self._cancel(task, force=False, recursive=False)
                self.tasks.pop(task.task_id, None)

    async def _reap_loop(self) -> None:
        """Notice workers that exit before or without closing their stream."""
        while not self._stopping.is_set():
            # No worker at all (a hollow node, a node with nothing prestarted):
            # nothing can exit, so once a second is enough.
            await asyncio.sleep(0.2 if self.pool.by_id else 1.0)
            self.pool.reap()
            self.envs.reclaim_idle_workers()
            for worker in list(self.pool.by_id.values()):
                if worker.process.poll() is not None and worker.conn is None:
                    log.warning("worker pid %d exited with %s before connecting",
                                worker.pid, worker.process.returncode)
                    self.pool.forget(worker)
                    # Tasks waiting on a worker for this env get a new start.
                    self.dispatch.handle(m.WorkerStartFailed(worker.env_key))

    # ------------------------------------------------------------ questions
    def local_node_record(self) -> dict:
        record = {
            "NodeID": self.node_id.hex(),
            "Alive": True,
            "NodeManagerAddress": self.config.host,
            "NodeManagerPort": int(self.address.rsplit(":", 1)[1]) if self.address else 0,
            "Resources": self.resources.total.to_dict(),
            "Labels": dict(self.config.labels),
            "MetricsExportPort": self.metrics.port,
            "DashboardPort": self.http.port,
        }
        if self.data_server is not None:
            record["DataPort"] = self.data_server.port
        if self.drain.plan is not None:
            record["Draining"] = self.drain.plan.record()   # peers stop offering it work
        return record

    async def _ask_store_stats(self, conn, payload: dict) -> dict:
        """This node's object store counters: capacity, bytes used, reservations..."""
        return self.store.stats()

    def _answer_cluster(self, method: str, local_available: dict):
        """Cluster-wide questions, answered from the etcd view (off the loop)."""
        membership = self.membership
        if method == "available_resources":
            return membership.available_resources(local_available) if membership else local_available
        if method == "cluster_resources":
            return membership.cluster_resources() if membership else self.resources.total.to_dict()
        if method == "nodes":
            return membership.nodes() if membership else [self.local_node_record()]
        if method == "node_usage":
            # Per-node availability as this node's view holds it (ours is live).
            usage = membership.availabilities() if membership else {}
            usage[self.node_id.hex()] = local_available
            return usage
        raise ValueError(f"unknown request method {method!r}")
