"""The submitter's half of worker leases: tasks pushed straight to a worker.

A task sent through the node costs four hops (this process -> node ->
worker -> node -> this process); a task pushed on a lease costs two, as an
actor call does. The node decides once per lease whether this process may
hold one of its workers (``node/state/lease_life.py``); the tasks that
follow go to that worker directly, one at a time, until the lease has been
idle for LEASE_IDLE_S, or at once if a task of its class had to go through
the node meanwhile (the node is then short of room, and may need the
worker for it).

Which tasks: those the node would run unchanged on a plain worker of this
node (:func:`pushable`) whose ref arguments all have values here already
(a pushed task never waits on a worker for its inputs). Everything else,
and every task for which no lease is idle, goes through the node as before;
a task of a class with no lease held asks for one first and waits for the
answer (one node round trip, once per lease: sent without waiting, the ask
would reach the node behind the task and find its resources taken by it);
a task that finds every lease of its class busy asks for another on the
side, for the tasks after it.

What the node would have done per task, the holder does here:

- results come back on the link and are this process's alone until a ref
  to one leaves it (as an actor call's, ``CoreWorker.ensure_registered``);
  a stored value is handed to the node by the worker first;
- a worker's death (the link breaks with a task out): the task runs again
  through the node if ``max_retries`` allows (one retry spent), else it
  fails with WorkerCrashedError naming the worker's exit status, which the
  node tells (``lease_end``); the lease is given back with ``kill`` so a
  worker cut off by a broken link cannot run on beside the retry;
- a kill by the node's memory monitor (``lease_end`` gives its verdict,
  made by the node's rules from what the worker told it it runs): run again
  after the monitor's delay with none of ``max_retries`` spent, or fail
  with OutOfMemoryError and the figures;
- a retryable error (``retry_exceptions``) likewise runs again through the
  node while retries are left;
- a task the worker refused (it did not know the lease) or never received
  goes through the node with no retry spent: it did not run;
- ``cancel``: a pushed task is interrupted on its worker as a node's task
  is (KeyboardInterrupt); ``force=True`` kills the worker through the node;
- no lineage: a stored result lives, pinned, in the store of this process's
  own node, lost only with that node -- which this process does not outlive.

Alternatives considered: a queue of tasks per lease (pipelining) -- a task
longer than expected would strand the ones behind it, and the node's own
pipelining already serves bursts; asking without waiting (the ask reaches
the node behind the task that made it, which takes the resources: on a
one-CPU node no lease would ever be granted); waiting on every task while
the node is full (a refusal makes the class wait REFUSED_BACKOFF_S before
asking again, and only a class with no lease waits); leases on other nodes (spilling stays the
node's: a peer's lease would need its own retry and liveness story, and the
node's spill path already carries bursts).

Safety rests on: a pushed task is in exactly one place -- its lease's
``task`` -- until it is answered, rerouted or failed, each done once under
``_lock``; a result is taken only for the task its lease holds (a stale
answer is dropped); and the node kills a leased worker whose holder goes
away, so no pushed task outlives the process that owns its results.
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field

from meshray import exceptions
from meshray.rpc import call_link
from meshray.rpc.call_link import LinkClosed
from meshray.rpc.generated import meshray_pb2 as pb

__all__ = ["TaskLeases", "pushable", "LEASE_IDLE_S"]

log = logging.getLogger(__name__)

LEASE_IDLE_S = 0.02          # an idle lease goes back after this long
REFUSED_BACKOFF_S = 0.05     # after a refusal, a class asks again only after this
ASK_WAIT_S = 2.0             # how long a task waits for the node's answer to a lease request
LEASE_END_WAIT_S = 10.0      # how long a failing task waits to hear how its worker ended
MAX_LEASES_PER_CLASS = 64
_PLAIN_RESOURCES = frozenset({"CPU", "memory"})


def pushable(spec) -> str:
    """Why the task `spec` may not be pushed on a lease ("" if it may).

    Only a task the node would hand unchanged to a plain worker of its own
    may be pushed: placement (strategies, groups, other resources), runtime
    environments and streams stay the node's.
    """
    if spec.actor_id or spec.actor_creation:
        return "an actor task"
    if spec.num_returns < 0 or spec.dynamic_returns:
        return "a generator task"
    if spec.scheduling_strategy not in ("", "DEFAULT") or spec.strategy_blob:
        return f"scheduling strategy {spec.scheduling_strategy}"
    if spec.runtime_env_json or spec.env_vars:
        return "a runtime environment"
    if not spec.resources or not set(spec.resources) <= _PLAIN_RESOURCES:
        return "resources other than CPU and memory"
    if spec.args_image or spec.args_file:
        return "an argument file"
    return ""


def _class_key(spec) -> tuple:
    return tuple(sorted(spec.resources.items()))


@dataclass(eq=False)
class _Pushed:
    spec: object
    return_ids: list
    keepalive: list
    cancelled: bool = False


@dataclass(eq=False)
class _Lease:
    lease_id: bytes
    key: tuple
    address: str
    pid: int
    idle_since: float
    worker_hex: str = ""
    busy: bool = False              # a task is taken for it (pushed or about to be)
    task: _Pushed | None = None
    link: object = None
    usable: bool = True             # False once given back or broken
    functions: set = field(default_factory=set)   # function ids its link carried
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(eq=False)
class _Class:
    leases: list = field(default_factory=list)
    requesting: bool = False
    retry_at: float = 0.0
    overflow_at: float = -1e9       # when a task of this class last went through the node


class TaskLeases:
    """This process's worker leases, by class of task (see the module doc)."""

    def __init__(self, core):
        self._core = core
        self._lock = threading.Lock()
        self._classes: dict[tuple, _Class] = {}
        self._by_task: dict[bytes, _Lease] = {}
        self._keeper: threading.Thread | None = None
        self._wake = threading.Event()
        self._closed = False
        self.enabled = os.environ.get("MESHRAY_WORKER_LEASES", "1") != "0"
        self.pushed = 0             # tasks pushed on leases (for tests and benchmarks)

    # ------------------------------------------------------------ submitting
    def take(self, spec):
        """An idle lease reserved for `spec`, or None: send it through the node."""
        if not self.enabled or self._closed or pushable(spec):
            return None
        if spec.arg_ref_ids and not self._core.has_values(spec.arg_ref_ids):
            return None
        key = _class_key(spec)
        now = time.monotonic()
        ask = False
        with self._lock:
            cls = self._classes.get(key)
            if cls is None:
                cls = self._classes[key] = _Class()
            for lease in cls.leases:
                if lease.usable and not lease.busy:
                    lease.busy = True
                    return lease
            if cls.leases:
                cls.overflow_at = now      # every lease busy: the node may need one back
            if not cls.requesting and now >= cls.retry_at \
                    and len(cls.leases) < MAX_LEASES_PER_CLASS:
                cls.requesting = ask = True
                wait = not cls.leases
        if not ask:
            return None
        if not wait:
            self._ask(key, spec)           # more leases for a busy class: not waited for
            return None
        # None held: this task waits for the node's answer and runs on the
        # lease if granted. (Sent on without waiting, it would reach the node
        # first and take the very resources the lease then lacks.)
        lease = self._ask_now(key, spec)
        with self._lock:
            if lease is not None and lease.usable and not lease.busy:
                lease.busy = True
                return lease
        return None

    def push(self, lease: _Lease, spec, return_ids: list, keepalive: list,
             pickled: bytes) -> None:
        """Send `spec` on `lease` (reserved by take); its return refs exist already."""
        pushed = _Pushed(spec, return_ids, keepalive)
        with self._lock:
            lease.task = pushed
            self._by_task[spec.task_id] = lease
            self.pushed += 1
        failure = ""
        with lease.lock:
            link = lease.link
            if link is None and lease.usable:
                try:
                    link = lease.link = call_link.connect(lease.address, token=self._core.token)
                except LinkClosed as exc:
                    failure = f"could not reach the leased worker: {exc.details}"
                else:
                    threading.Thread(target=self._read, args=(lease, link), daemon=True,
                                     name=f"meshray-lease-{lease.pid}").start()
            elif link is None:
                failure = "the lease ended before the task was sent"
            if not failure:
                batch = pb.ActorCallBatch(calls=[spec], caller_id=self._core.worker_id,
                                          lease_id=lease.lease_id)
                if spec.function_id not in lease.functions:
                    batch.functions.add(function_id=spec.function_id, pickled=pickled,
                                        name=spec.name)
                    lease.functions.add(spec.function_id)
                try:
                    link.send(call_link.CALLS, batch.SerializeToString(), now=True)
                except LinkClosed as exc:
                    # The reading thread sees the break and decides what the task needs.
                    log.debug("lease %s: sending a task failed: %s", lease.lease_id.hex(), exc)
        if failure:
            # (Outside the lease's lock, which giving the lease back takes.)
            self._broken(lease, failure, delivered=False)

    def cancel(self, task_id: bytes, force: bool) -> bool:
        """Cancel a pushed task; False if `task_id` is not one."""
        with self._lock:
            lease = self._by_task.get(task_id)
            if lease is None or lease.task is None:
                return False
            lease.task.cancelled = True
        if force:
            # The worker dies; the broken link fails the task as cancelled.
            self._give_back(lease, kill=True, why="cancel(force=True) of its task")
            return True
        with lease.lock:
            link = lease.link
            if link is not None:
                try:
                    link.send(call_link.CALLS, pb.ActorCallBatch(
                        lease_id=lease.lease_id, cancel_task_ids=[task_id]).SerializeToString())
                except LinkClosed:
                    pass      # the link broke: the task fails as cancelled there
        return True

    # ------------------------------------------------------------ leases
    def _ask(self, key: tuple, spec) -> None:
        """Ask for another lease of a busy class; the answer is not waited for."""
        future = self._request_lease(key, spec)
        if future is not None:
            future.add_done_callback(lambda f: self._answered_ask(key, f, ""))

    def _ask_now(self, key: tuple, spec):
        """Ask for a lease and wait for the answer (ASK_WAIT_S at most): the lease or None."""
        future = self._request_lease(key, spec)
        if future is None:
            return None
        try:
            future.result(ASK_WAIT_S)
        except concurrent.futures.TimeoutError:
            # Not waited for any longer; a late grant still joins the class.
            future.add_done_callback(lambda f: self._answered_ask(key, f, ""))
            return None
        except Exception:  # noqa: BLE001 - read by _answered_ask
            pass
        return self._answered_ask(key, future, "")

    def _request_lease(self, key: tuple, spec):
        """Send `lease_worker` for `spec`'s class: the answer's future, or None
        (the session is gone: the class counts as refused)."""
        try:
            return self._core.request_async("lease_worker", {"resources": dict(spec.resources)})
        except Exception as exc:  # noqa: BLE001 - the session is gone: no lease
            self._answered_ask(key, None, str(exc))
            return None

    def _answered_ask(self, key: tuple, future, error: str):
        answer: dict = {}
        if future is not None:
            try:
                reply = future.result()
                if reply.error:
                    error = reply.error
                else:
                    answer = json.loads(reply.payload)
            except Exception as exc:  # noqa: BLE001 - the session ended
                error = str(exc)
        now = time.monotonic()
        lease = None
        with self._lock:
            cls = self._classes.setdefault(key, _Class())
            cls.requesting = False
            if answer.get("granted") and answer.get("address"):
                lease = _Lease(bytes.fromhex(answer["lease_id"]), key, answer["address"],
                               int(answer.get("pid") or 0), idle_since=now,
                               worker_hex=str(answer.get("worker_id") or ""))
                if self._closed:
                    lease.usable = False
                else:
                    cls.leases.append(lease)
            else:
                cls.retry_at = now + REFUSED_BACKOFF_S
                if error:
                    log.debug("lease request failed: %s", error)
        if lease is not None:
            if not lease.usable:
                self._give_back(lease, kill=False, why="")
                return None
            self._start_keeper()
        return lease

    def _give_back(self, lease: _Lease, *, kill: bool, why: str) -> None:
        with self._lock:
            lease.usable = False
            cls = self._classes.get(lease.key)
            if cls is not None and lease in cls.leases:
                cls.leases.remove(lease)
        try:
            self._core.request_async("return_lease", {"lease_id": lease.lease_id.hex(),
                                                      "kill": kill, "why": why})
        except Exception:  # noqa: BLE001 - the session is gone: the node ends the lease
            pass
        if not kill:
            self._close_link(lease)

    @staticmethod
    def _close_link(lease: _Lease) -> None:
        with lease.lock:
            link, lease.link = lease.link, None
        if link is not None:
            link.close()

    def _start_keeper(self) -> None:
        with self._lock:
            if self._keeper is not None or self._closed:
                return
            self._keeper = threading.Thread(target=self._keep, name="meshray-leases",
                                            daemon=True)
            self._keeper.start()

    def _keep(self) -> None:
        """Give back leases idle for LEASE_IDLE_S; ends when none is held."""
        while not self._closed:
            self._wake.wait(LEASE_IDLE_S / 2)
            now = time.monotonic()
            with self._lock:
                idle = [lease for cls in self._classes.values() for lease in cls.leases
                        if lease.usable and not lease.busy
                        and now - lease.idle_since >= LEASE_IDLE_S]
                for lease in idle:
                    lease.usable = False       # no task is taken for it from here on
                held = any(cls.leases or cls.requesting for cls in self._classes.values())
                if not held and not idle:
                    self._keeper = None
                    return
            for lease in idle:
                self._give_back(lease, kill=False, why="")

    # ------------------------------------------------------------ answers
    def _read(self, lease: _Lease, link) -> None:
        try:
            while (payload := link.recv_reply()) is not None:
                for result in pb.ActorReplyBatch.FromString(payload).results:
                    self._answered(lease, result)
            self._broken(lease, "the leased worker ended the link", delivered=True)
        except LinkClosed as exc:
            self._broken(lease, exc.details or "the link to the leased worker broke",
                         delivered=not exc.refused)
        except Exception as exc:  # noqa: BLE001 - the link broke some other way
            self._broken(lease, f"the link to the leased worker broke: {exc}", delivered=True)

    def _answered(self, lease: _Lease, result) -> None:
        now = time.monotonic()
        with self._lock:
            pushed = lease.task
            if pushed is None or pushed.spec.task_id != result.task_id:
                return                     # not this lease's task (any more)
            lease.task = None
            self._by_task.pop(result.task_id, None)
            cls = self._classes.get(lease.key)
            give_back = self._closed or (cls is not None
                                         and now - cls.overflow_at < LEASE_IDLE_S)
            lease.idle_since = now
            lease.busy = give_back         # given back: nobody takes it meanwhile
        if give_back:
            self._give_back(lease, kill=False, why="")
        if result.failed and result.retryable_error and _spend_retry(pushed.spec):
            self._core.reroute_to_node(pushed.spec, pushed.return_ids)
            return
        self._core.deliver_actor_result(result)

    def _broken(self, lease: _Lease, why: str, *, delivered: bool) -> None:
        """The link ended (or never worked): the lease is over; its task runs
        again, fails, or is sent through the node (see the module doc)."""
        with self._lock:
            was_usable = lease.usable
            lease.usable = False
            cls = self._classes.get(lease.key)
            if cls is not None and lease in cls.leases:
                cls.leases.remove(lease)
            pushed, lease.task = lease.task, None
            if pushed is not None:
                self._by_task.pop(pushed.spec.task_id, None)
            closing = self._closed
        if closing:
            self._close_link(lease)
            return          # the session ends: nothing can run or be rerouted any more
        if was_usable:
            # A worker cut off from us may still run the task: it must not
            # run on beside a retry (a dead worker's lease is over already).
            self._give_back(lease, kill=pushed is not None and delivered, why=why)
        self._close_link(lease)
        if pushed is None:
            return
        spec = pushed.spec
        if pushed.cancelled:
            self._core.fail_locally(pushed.return_ids,
                                    exceptions.TaskCancelledError(spec.task_id.hex()))
            return
        if not delivered:
            self._core.reroute_to_node(spec, pushed.return_ids)   # it never ran
            return
        end = self._worker_end(lease)
        oom = end.get("oom")
        if isinstance(oom, dict):
            self._after_memory_kill(pushed, oom, end.get("retry_in"))
        elif _spend_retry(spec):
            self._core.reroute_to_node(spec, pushed.return_ids)
        else:
            self._core.fail_locally(pushed.return_ids, exceptions.WorkerCrashedError(
                f"The worker (pid {lease.pid}) running task {spec.name} died: "
                f"{end.get('exit') or f'its link ended ({why})'}; no retries left "
                f"(max_retries={spec.max_retries}).", task_id=spec.task_id,
                worker_id=bytes.fromhex(lease.worker_hex) if lease.worker_hex else None,
                node_id=self._core.node_id))

    def _worker_end(self, lease: _Lease) -> dict:
        """How the lease's worker ended, as its node saw it: its exit ("killed by
        signal 9 (SIGKILL)"), and the memory monitor's verdict if it killed it.
        Empty when the node cannot say."""
        try:
            return self._core.request("lease_end", {"lease_id": lease.lease_id.hex()},
                                      timeout=LEASE_END_WAIT_S)
        except Exception as exc:  # noqa: BLE001 - the node did not say
            log.debug("lease %s: the node did not say how its worker ended: %s",
                      lease.lease_id.hex(), exc)
            return {}

    def _after_memory_kill(self, pushed: _Pushed, oom: dict, retry_in) -> None:
        """The node's memory monitor killed the worker: as for its own tasks,
        a retriable task runs again after the delay it gave, spending none of
        max_retries; any other fails with OutOfMemoryError and the figures."""
        spec = pushed.spec
        if isinstance(retry_in, (int, float)) and not isinstance(retry_in, bool):
            spec.attempt += 1
            timer = threading.Timer(max(0.0, float(retry_in)), self._core.reroute_to_node,
                                    args=(spec, pushed.return_ids))
            timer.daemon = True
            timer.start()
            return
        fields = {key: oom.get(key) for key in ("memory_used", "memory_limit", "threshold",
                                                "rss")}
        self._core.fail_locally(pushed.return_ids, exceptions.OutOfMemoryError(
            str(oom.get("message") or "killed by its node's memory monitor"),
            task_id=oom.get("task_id"), node_id=oom.get("node_id"),
            worker_id=oom.get("worker_id"), **fields))

    def release_idle(self) -> None:
        """Give back every idle lease now: before the node is asked what is
        free, so its answer does not count resources nothing is using."""
        with self._lock:
            idle = [lease for cls in self._classes.values() for lease in cls.leases
                    if lease.usable and not lease.busy]
            for lease in idle:
                lease.usable = False
        for lease in idle:
            self._give_back(lease, kill=False, why="")

    # ------------------------------------------------------------ closing
    def close(self) -> None:
        """Give every lease back (the session is about to end)."""
        with self._lock:
            self._closed = True
            leases = [lease for cls in self._classes.values() for lease in cls.leases]
        self._wake.set()
        for lease in leases:
            self._give_back(lease, kill=lease.task is not None, why="its holder is closing")


def _spend_retry(spec) -> bool:
    """Spend one of the task's retries (-1: unlimited) for a new attempt."""
    if spec.max_retries == 0:
        return False
    if spec.max_retries > 0:
        spec.max_retries -= 1
    spec.attempt += 1
    return True
