"""The core worker: what every driver and worker process runs to take part.

It holds the process's session with its node daemon (a session link on the
node's unix socket: rpc/session_link.py), the values this process has
received, its local reference counts, and the submission side of tasks.
Outgoing events are queued; one that comes while the session has been quiet
(a lone task whose result the caller will wait for) is written at once by
the thread that made it, and events that come in a burst are left to the
session's writer thread, which drains the queue into batches, so many
`.remote()` calls in a row cost few messages.
"""
from __future__ import annotations

import base64
import concurrent.futures
import itertools
import json
import logging
import os
import pickle
import queue
import sys
import threading
import time

from meshray import exceptions
from meshray.common import ids
from meshray.core import object_ref, progress_bars, serialization
from meshray.core.actor_client import ActorConnection
from meshray.core.task_leases import TaskLeases
from meshray.core.object_ref import ArgPlaceholder, ObjectRef, substitute_refs
from meshray.core.streams import StreamsMixin
from meshray.object_store import layout
from meshray.rpc import call_link
from meshray.rpc.call_link import LinkClosed
from meshray.rpc.dispatch import dispatch_table
from meshray.rpc.generated import meshray_pb2 as pb

__all__ = ["CoreWorker"]

log = logging.getLogger(__name__)

_MAX_BATCH = 2000
_MAX_REF_BATCH = 5000


class _RefBatch:
    """Reference changes not yet sent, in one RefUpdate (see _queue_ref_change)."""

    __slots__ = ("add", "remove", "removed")

    def __init__(self):
        self.add: list = []
        self.remove: list = []
        self.removed: set = set()
_NO_ARGS_BLOB = serialization.serialize(([], {})).inband
CONNECT_TIMEOUT_S = 15.0
# How long close() waits for the threads that touch the session stream.
CLOSE_JOIN_S = 5.0
# An event queued this soon after the session's last write is part of a
# burst: the writer thread sends it with whatever else comes meanwhile.
_QUIET_S = 0.0002


class _Waiter:
    __slots__ = ("needed", "event")

    def __init__(self, needed: int):
        self.needed = needed
        self.event = threading.Event()


def _session_refused(exc: BaseException | None, address: str = "") -> ConnectionError:
    """Why the node would not open or ended the session before welcoming
    us: credentials, or anything else."""
    details = getattr(exc, "details", None) or str(exc or "")
    if isinstance(exc, LinkClosed) and "proving membership" in details:
        return exceptions.AuthenticationError(
            f"the node daemon refused this process's credentials ({details}); "
            "check the cluster token (init(_token=...), MESHRAY_TOKEN or MESHRAY_TOKEN_FILE)")
    if isinstance(exc, LinkClosed) and not exc.reached:
        return ConnectionError(f"cannot reach the node daemon at {address}: {details}")
    return ConnectionError("node daemon closed the session"
                           + (f": {details}" if details else ""))


class CoreWorker(StreamsMixin):
    def __init__(self, *, daemon_address: str, token: str | None, role: str,
                 worker_id: bytes | None = None, job_id: bytes = b"", namespace: str = "",
                 log_to_driver: bool = True, on_execute=None, on_kill=None,
                 call_address: str = "", on_lease=None):
        self.role = role
        self.token = token
        self.worker_id = worker_id or ids.new_id()
        self.job_id = job_id
        self.namespace = namespace
        self._execute_callback = on_execute
        self._kill_callback = on_kill
        self._handlers = dispatch_table(pb.ServerEvent, {
            "welcome": self._on_welcome, "ready": self._on_ready, "execute": self._on_execute,
            "kill": self._on_kill, "reserve_reply": self._on_answer, "reply": self._on_answer,
            "logs": self._on_logs, "notice": self._on_notice,
            "lease": on_lease or self._on_unexpected_lease})
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        # Re-entrant: ObjectRef.__del__ may run (via GC) while this thread holds it.
        self._lock = threading.RLock()
        # Innermost lock: the open batch of ref changes and the outbox order.
        self._ref_lock = threading.Lock()
        self._ref_batch: _RefBatch | None = None
        self._changed = threading.Condition(self._lock)
        self._values: dict[bytes, pb.ObjectValue] = {}
        # Store objects this process has mapped, so every get of one object
        # returns views of the same shared memory (and maps it only once).
        self._mapped: dict[bytes, tuple] = {}
        self._subscribed: set[bytes] = set()
        self._waiters: dict[bytes, list] = {}    # object id -> gets/waits counting down
        self._local_refs: dict[bytes, int] = {}
        self._futures: dict[bytes, list] = {}
        self._streams: dict = {}      # task id -> its stream (streams.py)
        self._requests: dict[int, concurrent.futures.Future] = {}
        self._request_ids = itertools.count(1)
        self._functions_sent: set[bytes] = set()
        # Returns of actor calls arrive here directly; the node learns of one
        # only if the ref leaves this process (passed to a task, put in an
        # object) -- until then they cost the node nothing.
        self._local_only: set[bytes] = set()
        # Ids the node already counts us as holding (task returns we submitted,
        # objects we put): their first local ref needs no "add" message.
        self._node_knows: set[bytes] = set()
        self._register_on_arrival: set[bytes] = set()
        self._actor_connections: dict[bytes, object] = {}
        self.leases = TaskLeases(self)      # worker leases: tasks pushed to workers directly
        self._put_task_id = b""             # set once the node's id is known
        self._put_counter = itertools.count(1)
        self._closed = False
        self._lost = False
        self.current_task_id = b""
        self.store_dir = ""
        self.node_id = b""
        self.session_dir = ""
        self.node_address = ""

        try:
            self._link = call_link.connect(daemon_address, token=token,
                                           magic=call_link.SESSION_MAGIC, tls=None)
        except LinkClosed as exc:
            raise _session_refused(exc, daemon_address) from None
        self._turn = threading.Lock()          # held by the thread writing the outbox
        self._wake = threading.Event()         # the writer thread has work
        self._last_write = 0.0
        self._welcome = concurrent.futures.Future()
        self._reader = threading.Thread(target=self._read_loop, name="meshray-reader", daemon=True)
        self._sender = threading.Thread(target=self._write_loop, name="meshray-writer",
                                        daemon=True)
        self._sender.start()
        self._send(pb.ClientEvent(hello=pb.Hello(
            role=role, worker_id=self.worker_id, pid=os.getpid(), job_id=job_id,
            namespace=namespace, log_to_driver=log_to_driver, call_address=call_address)))
        self._reader.start()
        try:
            welcome = self._welcome.result(CONNECT_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            self.close()
            raise ConnectionError(
                f"node daemon at {daemon_address} did not answer within {CONNECT_TIMEOUT_S:.0f}s")
        self.node_id = welcome.node_id
        self.store_dir = welcome.store_dir
        self.session_dir = welcome.session_dir
        self.node_address = welcome.node_address
        self._put_task_id = ids.new_task_id(self.node_id)
        object_ref.set_tracker(self)

    # ------------------------------------------------------------ transport
    def _send(self, event: pb.ClientEvent) -> None:
        with self._ref_lock:
            self._ref_batch = None      # ref changes after this event go after it
            self._outbox.put(event)
        self._flush()

    def _flush(self, now: bool = True) -> None:
        """Write what waits in the outbox: here and now when the session has
        been quiet (no thread hop for a lone event), else by the writer thread."""
        if now and time.monotonic() - self._last_write > _QUIET_S \
                and self._turn.acquire(blocking=False):
            try:
                self._write_outbox()
            finally:
                self._turn.release()
            if self._outbox.empty():
                return
        self._wake.set()

    def _write_loop(self) -> None:
        while not self._lost:
            self._wake.wait()
            self._wake.clear()
            with self._turn:
                if not self._write_outbox():
                    return

    def _write_outbox(self) -> bool:
        """Send the outbox's events (the caller holds the turn); False once
        the session is over (closed here, or broken)."""
        while True:
            events, done = [], False
            while len(events) < _MAX_BATCH:
                try:
                    event = self._outbox.get_nowait()
                except queue.Empty:
                    break
                if event is None:
                    done = True
                    break
                events.append(self._as_event(event))
            try:
                if events:
                    self._link.send(call_link.CALLS,
                                    pb.ClientBatch(events=events).SerializeToString())
                    self._last_write = time.monotonic()
                if done:
                    self._link.send(call_link.END)
                    return False
            except (LinkClosed, ValueError) as exc:
                log.debug("writing to the node failed: %s", exc)   # the reader sees the end
                return False
            if not events:
                return True

    def _queue_ref_change(self, object_id: bytes, added: bool) -> None:
        """Coalesce reference changes into one RefUpdate per run between other events.

        Within a batch the node applies adds before removes, so an add may
        join an open batch (it only moves earlier) but a re-add of an id the
        batch removes starts a new one; removes never move before an event
        sent earlier (that event may be what still needs the object).
        """
        with self._ref_lock:
            batch = self._ref_batch
            if batch is None or len(batch.add) + len(batch.remove) >= _MAX_REF_BATCH or (
                    added and object_id in batch.removed):
                batch = self._ref_batch = _RefBatch()
                self._outbox.put(batch)
                wake = True
            else:
                wake = False
            if added:
                batch.add.append(object_id)
            else:
                batch.remove.append(object_id)
                batch.removed.add(object_id)
        if wake:
            # Never written here: this may run in a finalizer (ObjectRef.__del__).
            self._wake.set()

    def _as_event(self, item) -> pb.ClientEvent:
        if isinstance(item, _RefBatch):
            with self._ref_lock:
                if self._ref_batch is item:
                    self._ref_batch = None      # closed: nothing joins it any more
            return pb.ClientEvent(refs=pb.RefUpdate(add=item.add, remove=item.remove))
        return item

    def _read_loop(self) -> None:
        ended = None
        try:
            while (payload := self._link.recv_reply()) is not None:
                for event in pb.ServerBatch.FromString(payload).events:
                    kind = event.WhichOneof("kind")
                    try:
                        self._handlers[kind](getattr(event, kind))
                    except Exception:  # noqa: BLE001 - keep reading
                        log.exception("failed to handle %s from the node", kind)
        except Exception as exc:  # noqa: BLE001 - the session ended
            ended = exc
            if isinstance(exc, LinkClosed) and exc.code == call_link.MALFORMED:
                # This process sent something malformed: a bug worth seeing.
                log.error("the node refused this process's session: %s", exc.details)
            elif not self._closed:
                log.debug("session ended: %s", exc)
        finally:
            with self._lock:
                self._lost = not self._closed
                self._changed.notify_all()
                for waiters in self._waiters.values():
                    for waiter in waiters:
                        waiter.event.set()
            if not self._welcome.done():
                self._welcome.set_exception(_session_refused(ended))
            for future in list(self._requests.values()):
                if not future.done():
                    future.set_exception(ConnectionError("node daemon connection lost"))
            self._wake.set()                  # the writer thread ends too
            if self._lost and self._kill_callback is not None:
                self._kill_callback(None)

    def _on_welcome(self, welcome: pb.Welcome) -> None:
        self._welcome.set_result(welcome)

    def _on_ready(self, msg: pb.ObjectReady) -> None:
        value = msg.value
        object_id = value.object_id
        futures = ()
        with self._lock:
            self._values[object_id] = value
            task_id = ids.task_id_of(object_id)
            stream = self._streams.get(task_id)
            if stream is not None:
                self._stream_arrived(stream, value)
            futures = self._futures.pop(object_id, ())
            for waiter in self._waiters.pop(object_id, ()):
                waiter.needed -= 1
                if waiter.needed <= 0:
                    waiter.event.set()
            if stream is not None:
                self._changed.notify_all()
        for future in futures:
            self._resolve_future(future, object_id)

    def _on_execute(self, msg: pb.ExecuteTask) -> None:
        if self._execute_callback is not None:
            self._execute_callback(msg)

    def _on_kill(self, msg: pb.KillTask) -> None:
        if self._kill_callback is not None:
            self._kill_callback(msg)

    def _on_answer(self, msg) -> None:
        """A ReserveReply or Reply: the answer to one of our numbered requests."""
        future = self._requests.pop(msg.request_id, None)
        if future is not None:
            future.set_result(msg)

    def _on_logs(self, msg: pb.LogBatch) -> None:
        progress_bars.PRINTER.show_logs(msg.lines)    # remote progress bars drawn, not printed

    @staticmethod
    def _on_unexpected_lease(msg: pb.LeaseChange) -> None:
        log.warning("the node sent a lease change (%s) to a process that serves no lease",
                    msg.lease_id.hex())

    def _on_notice(self, msg: pb.Notice) -> None:
        # Printed, not also logged: with logging unconfigured, Python's
        # last-resort handler prints warnings to stderr too, so the user saw
        # every notice twice.
        sys.stderr.write(f"(meshray) {msg.text}\n")   # one write: never split by another line
        sys.stderr.flush()

    def request(self, method: str, payload: dict | None = None, timeout: float = 30.0):
        """Ask the node a question answered with JSON."""
        request_id = next(self._request_ids)
        future = concurrent.futures.Future()
        self._requests[request_id] = future
        self._send(pb.ClientEvent(request=pb.Request(
            request_id=request_id, method=method, payload=json.dumps(payload or {}).encode())))
        try:
            reply = future.result(timeout)
        except concurrent.futures.TimeoutError:
            self._requests.pop(request_id, None)
            raise exceptions.GetTimeoutError(
                f"node did not answer {method!r} within {timeout}s") from None
        if reply.error:
            raise exceptions.RaySystemError(f"node failed to answer {method!r}: {reply.error}")
        return json.loads(reply.payload)

    def request_async(self, method: str, payload: dict | None = None
                      ) -> concurrent.futures.Future:
        """Send a request without waiting; the future gets the node's pb.Reply.

        Requests reach the node in the order they were sent, whether or not
        the sender waited for the earlier ones (used by placement groups)."""
        request_id = next(self._request_ids)
        future = concurrent.futures.Future()
        self._requests[request_id] = future
        self._send(pb.ClientEvent(request=pb.Request(
            request_id=request_id, method=method, payload=json.dumps(payload or {}).encode())))
        return future

    @property
    def lost(self) -> bool:
        """Whether the session with the node ended without this process closing it."""
        return self._lost

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        object_ref.set_tracker(None)
        self.leases.close()         # given back while the session still carries it
        for connection in list(self._actor_connections.values()):
            connection.close()
        # What is queued goes, then END; a node that does not read it within
        # the deadline is not waited for.
        self._outbox.put(None)
        self._link.set_timeout(CLOSE_JOIN_S)
        self._wake.set()
        self._sender.join(CLOSE_JOIN_S)
        self._link.shutdown()
        self._join_stream_threads(time.monotonic() + CLOSE_JOIN_S)

    def _join_stream_threads(self, deadline: float) -> None:
        """Wait (until `deadline`) for the threads that use this process's links.

        A daemon thread still running when the interpreter exits is stopped
        where it stands -- if that is inside a lock a finalizer needs during
        exit, the process, its work done, never ends. So the session's
        reader and writer and each actor connection's thread finish here.
        """
        current = threading.current_thread()
        for thread in (self._reader, self._sender):
            if thread is not None and thread is not current and thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))
        self._link.close()
        # The session is gone, so an actor connection waiting on the node
        # has its answer (an error) and ends too.
        for connection in list(self._actor_connections.values()):
            connection.join(deadline)

    # ------------------------------------------------------------ references
    def add_local_ref(self, object_id: bytes) -> None:
        with self._lock:
            count = self._local_refs.get(object_id, 0)
            self._local_refs[object_id] = count + 1
            silent = object_id in self._local_only
            if object_id in self._node_knows:
                self._node_knows.discard(object_id)
                silent = True
            if count == 0 and not silent:
                self._queue_ref_change(object_id, True)

    def remove_local_ref(self, object_id: bytes) -> None:
        with self._lock:
            count = self._local_refs.get(object_id, 0) - 1
            if count > 0:
                self._local_refs[object_id] = count
                return
            self._local_refs.pop(object_id, None)
            self._values.pop(object_id, None)
            self._mapped.pop(object_id, None)
            self._subscribed.discard(object_id)
            if object_id in self._local_only:
                # An actor call's result the node has not heard of. If a ref to
                # it left this process (a task argument), _register_on_arrival
                # still holds it: the value is registered when it arrives and
                # released for us at once (deliver_actor_result), so the task
                # that needs it gets it.
                self._local_only.discard(object_id)
                return
            if not self._closed:
                self._queue_ref_change(object_id, False)

    # ------------------------------------------------------------ actor results
    def mark_node_knows(self, object_ids) -> None:
        """The next message about these ids (a submit or put) tells the node we hold them."""
        with self._lock:
            self._node_knows.update(object_ids)

    def mark_local_only(self, object_ids) -> None:
        with self._lock:
            self._local_only.update(object_ids)

    def ensure_registered(self, object_ids) -> None:
        """Make sure the node knows these objects before a ref to them leaves us."""
        puts = []
        with self._lock:
            for object_id in object_ids:
                if object_id not in self._local_only:
                    continue
                value = self._values.get(object_id)
                if value is None:
                    self._register_on_arrival.add(object_id)
                    continue
                self._local_only.discard(object_id)
                puts.append(value)
        for value in puts:
            self._send(pb.ClientEvent(put=pb.PutObject(value=value)))

    def deliver_actor_result(self, result: pb.TaskResult) -> None:
        for value in result.returns:
            object_id = value.object_id
            register = release = False
            with self._lock:
                wanted = object_id in self._local_refs
                if value.in_store or object_id in self._register_on_arrival or not wanted:
                    # Store values must be sealed by the node even if unwanted.
                    register = value.in_store or object_id in self._register_on_arrival
                    release = not wanted
                    self._register_on_arrival.discard(object_id)
                    if register:
                        self._local_only.discard(object_id)
            if register:
                self._send(pb.ClientEvent(put=pb.PutObject(value=value)))
                if release:
                    self._send(pb.ClientEvent(refs=pb.RefUpdate(remove=[object_id])))
            if wanted:
                self._on_ready(pb.ObjectReady(value=value))

    def has_values(self, object_ids) -> bool:
        """Whether every one of these objects has its value known here."""
        with self._lock:
            values = self._values
            return all(object_id in values for object_id in object_ids)

    def reroute_to_node(self, spec: pb.TaskSpec, return_ids: list) -> None:
        """Send a task pushed on a lease (task_leases.py) through the node
        instead: its returns stop being ours alone, and the node holds them
        for us from its submission on (as for any task we submit)."""
        drop = []
        with self._lock:
            for object_id in return_ids:
                self._local_only.discard(object_id)
                self._register_on_arrival.discard(object_id)
                if object_id not in self._local_refs:
                    drop.append(object_id)      # already let go of: the node must not keep it
            self._subscribed.update(return_ids)
        self._send(pb.ClientEvent(submit=pb.SubmitTask(spec=spec)))
        if drop:
            self._send(pb.ClientEvent(refs=pb.RefUpdate(remove=drop)))

    def fail_locally(self, object_ids, error: BaseException) -> None:
        blob = pickle.dumps(error)
        self.deliver_actor_result(pb.TaskResult(returns=[
            pb.ObjectValue(object_id=oid, inline_data=blob, is_error=True) for oid in object_ids]))

    def actor_connection(self, actor_id: bytes, *, max_task_retries: int, class_name: str):
        with self._lock:
            connection = self._actor_connections.get(actor_id)
            if connection is None:
                connection = self._actor_connections[actor_id] = ActorConnection(
                    self, actor_id, max_task_retries=max_task_retries, class_name=class_name)
        return connection

    # ------------------------------------------------------------ objects
    def put(self, value) -> ObjectRef:
        if isinstance(value, ObjectRef):
            raise TypeError(
                "Calling 'put' on an ObjectRef is not allowed. If you really want to do "
                "this, you can wrap the ObjectRef in a list and call 'put' on it.")
        object_id = ids.object_id_for(self._put_task_id, next(self._put_counter))
        serialized = serialization.serialize(value, what="the value passed to put()")
        self.mark_node_knows((object_id,))
        ref = ObjectRef(object_id)
        self.store_value(object_id, serialized, local=True)
        return ref

    def store_value(self, object_id: bytes, serialized, *, local: bool) -> pb.ObjectValue:
        """Make an ObjectValue for `serialized`, writing it to the store if large.

        With local=True the value is also sent to the node as a put (the
        caller holds the ref); otherwise the caller ships the returned
        ObjectValue itself (task returns).
        """
        if serialized.contained_ids:
            self.ensure_registered(serialized.contained_ids)
        if serialized.is_inline:
            value = pb.ObjectValue(object_id=object_id, inline_data=serialized.inband,
                                   contained_ids=serialized.contained_ids)
        else:
            size = layout.object_size(len(serialized.inband),
                                      [memoryview(b).nbytes for b in serialized.buffers])
            path = self._reserve(object_id, size)
            layout.write_object(path, serialized.inband, serialized.buffers)
            value = pb.ObjectValue(object_id=object_id, in_store=True, size=size,
                                   contained_ids=serialized.contained_ids)
        if local:
            with self._lock:
                self._values[object_id] = value
            self._send(pb.ClientEvent(put=pb.PutObject(value=value)))
        return value

    def _reserve(self, object_id: bytes, size: int) -> str:
        request_id = next(self._request_ids)
        future = concurrent.futures.Future()
        self._requests[request_id] = future
        self._send(pb.ClientEvent(reserve=pb.ReserveObject(
            request_id=request_id, object_id=object_id, size=size)))
        reply = future.result(60.0)
        if reply.error:
            raise exceptions.ObjectStoreFullError(reply.error)
        return reply.path

    def _subscribe(self, object_ids) -> None:
        missing = []
        with self._lock:
            for object_id in object_ids:
                if object_id in self._local_only:
                    continue  # arrives on its actor's stream
                if object_id not in self._values and object_id not in self._subscribed:
                    self._subscribed.add(object_id)
                    missing.append(object_id)
        if missing:
            self._send(pb.ClientEvent(subscribe=pb.Subscribe(object_ids=missing)))

    def _wait_values(self, object_ids, num_needed: int, deadline: float | None) -> int:
        """Block until `num_needed` of the ids have values; return how many do.

        A waiter counts down as values arrive, so a get of N refs costs O(N)
        in total rather than a rescan of all N on every arrival.
        """
        self._subscribe(object_ids)
        return self._await_ids(object_ids, num_needed, deadline)

    def _await_ids(self, object_ids, num_needed: int, deadline: float | None) -> int:
        """_wait_values for ids already on their way here (subscribed, or direct)."""
        unique = set(object_ids)
        with self._lock:
            missing = [oid for oid in unique if oid not in self._values]
            ready = len(unique) - len(missing)
            if ready >= num_needed or not missing:
                return ready
            waiter = _Waiter(num_needed - ready)
            for oid in missing:
                self._waiters.setdefault(oid, []).append(waiter)
        self._set_blocked(True)
        try:
            while not waiter.event.is_set() and not self._lost:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                waiter.event.wait(1.0 if remaining is None else min(remaining, 1.0))
        finally:
            # No return in here: it would swallow a KeyboardInterrupt (a cancel).
            self._set_blocked(False)
            with self._lock:
                for oid in missing:
                    waiting = self._waiters.get(oid)
                    if waiting is not None and waiter in waiting:
                        waiting.remove(waiter)
                        if not waiting:
                            del self._waiters[oid]
        with self._lock:
            return sum(1 for oid in unique if oid in self._values)

    def _set_blocked(self, blocked: bool) -> None:
        if self.role != "worker" or not self.current_task_id:
            return
        self._send(pb.ClientEvent(blocked=pb.WorkerBlocked(blocked=blocked)))

    def get(self, refs: list, timeout: float | None = None) -> list:
        object_ids = [ref.binary() for ref in refs]
        deadline = None if timeout is None else time.monotonic() + timeout
        ready = self._wait_values(object_ids, len(set(object_ids)), deadline)
        if ready < len(set(object_ids)):
            if self._lost:
                raise exceptions.RaySystemError("lost the connection to the node daemon")
            raise exceptions.GetTimeoutError(
                f"Get timed out: some object(s) not ready after {timeout}s.")
        with self._lock:
            values = [self._values[oid] for oid in object_ids]
        return [self.materialize(value) for value in values]

    def materialize(self, value: pb.ObjectValue):
        """Turn an ObjectValue into the Python value (raising stored errors)."""
        if value.in_store:
            result = self._read_store(value.object_id, value.location, value.size)
        elif value.is_error:
            try:
                result = serialization.deserialize_inline(value.inline_data)
            except Exception as exc:  # noqa: BLE001 - say what failed, not an unpickling trace
                raise exceptions.UnserializableException(
                    f"the error stored for object {value.object_id.hex()} could not be "
                    f"deserialized here: {type(exc).__name__}: {exc}") from exc
        else:
            result = serialization.deserialize_inline(value.inline_data)
        if value.is_error:
            if isinstance(result, exceptions.RayTaskError):
                raise result.as_instanceof_cause()
            raise result
        return result

    def _read_store(self, object_id: bytes, location: str = "", size: int = 0):
        mapped = self._mapped.get(object_id)
        if mapped is None:
            path = os.path.join(self.store_dir, object_id.hex())
            try:
                mapped = layout.read_object(path)
            except FileNotFoundError:
                # Spilled to disk, or on another node: ask ours to make it local.
                reply = self.request("restore", {"object_id": object_id.hex(),
                                                 "location": location, "size": size},
                                     timeout=600)
                if "error_value" in reply:   # lost for good: the node says why
                    raise serialization.deserialize_inline(base64.b64decode(reply["error_value"]))
                mapped = layout.read_object(reply["path"])
            with self._lock:
                if object_id in self._local_refs:
                    self._mapped[object_id] = mapped
        return serialization.deserialize_buffers(*mapped)

    def wait(self, refs: list, num_returns: int, timeout: float | None,
             fetch_local: bool = True):
        """(ready, not_ready): ready once the value exists; with fetch_local, once it
        is also in this node's store (remote copies are pulled here meanwhile)."""
        object_ids = [ref.binary() for ref in refs]
        deadline = None if timeout is None else time.monotonic() + timeout
        self._wait_values(object_ids, num_returns, deadline)
        ready = []
        with self._lock:
            for ref in refs:
                if ref.binary() in self._values and len(ready) < num_returns:
                    ready.append(ref)
        if fetch_local and ready:
            ready = self._fetched_locally(ready, deadline)
        chosen = {id(ref) for ref in ready}
        return ready, [ref for ref in refs if id(ref) not in chosen]

    def _fetched_locally(self, refs: list, deadline: float | None) -> list:
        """Those of `refs` whose values are here by the deadline (pulling the others)."""
        pulls = {}
        with self._lock:
            values = {ref.binary(): self._values.get(ref.binary()) for ref in refs}
        for object_id, value in values.items():
            if (value is not None and value.in_store and object_id not in self._mapped
                    and not os.path.exists(os.path.join(self.store_dir, object_id.hex()))):
                pulls[object_id] = self.request_async("restore", {
                    "object_id": object_id.hex(), "location": value.location,
                    "size": value.size})
        if not pulls:
            return refs
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        concurrent.futures.wait(list(pulls.values()), remaining)
        return [ref for ref in refs if ref.binary() not in pulls or pulls[ref.binary()].done()]

    def future_for(self, ref: ObjectRef) -> concurrent.futures.Future:
        future = concurrent.futures.Future()
        future._meshray_ref = ref  # keep the ref (and so the value) alive
        object_id = ref.binary()
        with self._lock:
            present = object_id in self._values
            if not present:
                self._futures.setdefault(object_id, []).append(future)
        if present:
            self._resolve_future(future, object_id)
        else:
            self._subscribe([object_id])
        return future

    def _resolve_future(self, future, object_id: bytes) -> None:
        with self._lock:
            value = self._values.get(object_id)
        try:
            future.set_result(self.materialize(value))
        except BaseException as exc:  # noqa: BLE001 - delivered through the future
            future.set_exception(exc)

    # ------------------------------------------------------------ tasks
    def new_task_id(self) -> bytes:
        return ids.new_task_id(self.node_id)

    def ensure_function(self, function_id: bytes, pickled_fn, name: str) -> None:
        if function_id in self._functions_sent:
            return
        self._functions_sent.add(function_id)
        self._send(pb.ClientEvent(register_function=pb.RegisterFunction(
            function_id=function_id, pickled=pickled_fn(), name=name)))

    def build_args(self, args: tuple, kwargs: dict, name: str,
                   inline_limit: int = serialization.INLINE_THRESHOLD):
        """Pickle arguments, leaving top-level ObjectRefs to be resolved by the node.

        Returns (args_blob, arg_ref_ids, contained_ids, keepalive) where
        keepalive holds refs created here for large arguments until the
        submission message is queued.
        """
        if not args and not kwargs:
            return _NO_ARGS_BLOB, [], [], []
        new_args, new_kwargs, arg_refs, keepalive = substitute_refs(args, kwargs)
        try:
            serialized = serialization.serialize((new_args, new_kwargs),
                                                 what=f"the arguments of {name}",
                                                 inline_limit=inline_limit)
        except TypeError:
            # Say which argument could not be pickled, not just that one couldn't.
            for i, value in enumerate(new_args):
                serialization.serialize(value, what=f"argument {i} of {name}")
            for key, value in new_kwargs.items():
                serialization.serialize(value, what=f"keyword argument {key!r} of {name}")
            raise
        if not serialized.is_inline:
            # Large arguments go through the object store, one object each.
            for i, value in enumerate(new_args):
                new_args[i] = self._maybe_store_arg(value, f"argument {i} of {name}",
                                                    arg_refs, keepalive)
            for key, value in new_kwargs.items():
                new_kwargs[key] = self._maybe_store_arg(value, f"keyword argument {key!r} of {name}",
                                                        arg_refs, keepalive)
            serialized = serialization.serialize((new_args, new_kwargs),
                                                 what=f"the arguments of {name}")
        self.ensure_registered(arg_refs)
        self.ensure_registered(serialized.contained_ids)
        return serialized.inband, arg_refs, serialized.contained_ids, keepalive

    def _maybe_store_arg(self, value, what, arg_refs, keepalive):
        if isinstance(value, ArgPlaceholder):
            return value
        serialized = serialization.serialize(value, what=what)
        if serialized.is_inline:
            return value
        ref = ObjectRef(ids.object_id_for(self._put_task_id, next(self._put_counter)))
        self.store_value(ref.binary(), serialized, local=True)
        keepalive.append(ref)
        arg_refs.append(ref.binary())
        return ArgPlaceholder(len(arg_refs) - 1)

    def submit(self, spec: pb.TaskSpec, keepalive) -> None:
        # The node subscribes a task's submitter to its returns as it takes
        # the task (ObjectLife.submitted), so a get of them asks nothing more
        # of the node: one message per task instead of two.
        with self._lock:
            self._subscribed.update(ids.return_ids_of(spec.task_id, spec.num_returns))
        self._send(pb.ClientEvent(submit=pb.SubmitTask(spec=spec)))
        del keepalive  # refs may now drop: the queued submission pins them

    def cancel(self, ref: ObjectRef, force: bool, recursive: bool) -> None:
        task_id = ids.task_id_of(ref.binary())
        if self.leases.cancel(task_id, force):
            if recursive:
                # Its children went through the node, which cancels them.
                self._send(pb.ClientEvent(cancel=pb.CancelTask(
                    object_id=ref.binary(), force=force, recursive=True)))
            return
        with self._lock:
            connections = list(self._actor_connections.values())
        for connection in connections:
            # An actor call goes straight to its actor, so only this process
            # (its caller) can cancel it; the node never saw it.
            if connection.has_call(task_id):
                if force:
                    raise ValueError(
                        f"cancel(force=True) is not supported for actor tasks (the ref "
                        f"{ref.hex()} is a call to actor {connection.actor_id.hex()}); use "
                        "meshray.kill(actor) to end the actor, or force=False to cancel the call")
                connection.cancel(task_id)
                return
        self._send(pb.ClientEvent(cancel=pb.CancelTask(
            object_id=ref.binary(), force=force, recursive=recursive)))

    def send_task_result(self, result: pb.TaskResult) -> None:
        self._send(pb.ClientEvent(task_result=result))

    def send_handoff(self, value: pb.ObjectValue) -> None:
        self._send(pb.ClientEvent(put=pb.PutObject(value=value, handoff=True)))

    def send_actor_exiting(self, actor_id: bytes, reason: str, restartable: bool = False) -> None:
        self._send(pb.ClientEvent(actor_exiting=pb.ActorExiting(
            actor_id=actor_id, reason=reason, restartable=restartable)))

    def send_leased_task(self, spec: pb.TaskSpec, *, finished: bool, failed: bool = False
                         ) -> None:
        """Tell the node the task a lease's holder pushed here starts (or ended)."""
        self._send(pb.ClientEvent(leased_task=pb.LeasedTask(
            task_id=spec.task_id, name=spec.name[:1024], max_retries=spec.max_retries,
            attempt=spec.attempt, finished=finished, job_id=spec.job_id,
            parent_task_id=spec.parent_task_id, failed=failed)))

    def send_actor_task_events(self, report: pb.ActorTaskEvents) -> None:
        self._send(pb.ClientEvent(task_events=report))

    def send_metrics(self, updates: list) -> None:
        """User metric updates (meshray.util.metrics batches them) for our node to export."""
        self._send(pb.ClientEvent(metrics=pb.MetricsReport(updates=updates)))

    def outbox_empty(self) -> bool:
        return self._outbox.empty()
