"""The life of a task submitted to or placed on this node, as a state
machine: events in, instructions out.

Why: such a task meets messages from its owner (cancel), its arguments'
producers (ready), its worker (result, ``get`` blocking), the worker pool
(connected, died before connecting), runtime-env setup, and the node itself
(resources freed, drain), in any order. Each decision those messages call
for -- when it may be placed, which queued task starts, on which worker,
what follows it on that worker, whether a failure is retried, what a cancel
does in each state -- is made here, by
:meth:`NodeState.handle`, which changes only in-memory bookkeeping and returns
the instructions (``messages.py``) the daemon must carry out: send a task to a
worker, start workers, kill one, deliver values, place a task again. The
daemon (``node/daemon.py``) turns messages into events and carries out
instructions; it decides nothing about these tasks itself. So every decision
is unit-tested by feeding events and comparing instructions
(``tests/unit/test_node_state.py``), with no process, socket or event loop,
and a hollow node (``node/hollow.py``) runs the very same decisions as a real
one.

What it owns, and is the only writer of:

- a task's moves from queued to its result: queued, assigned, running,
  crashed, and back to waiting for a retry (through
  :func:`task_lifecycle.move`, the one writer of ``task.state``, where an
  illegal move raises with the task's story and the tail of the node's event
  log; the moves placement decides -- spilled, infeasible, waiting for a
  group -- and a task's end are made through it by the parts that decide
  them);
- the tasks waiting for their arguments (`waiting_on`: a task submitted
  here is placed once every argument object has its value);
- the local queue (``tasks.TaskQueue``: placement puts tasks in line and
  takes them out to offer them to peers with `Enqueue`/`Dequeue`, and reads
  it), the tasks holding resources while they wait for a worker
  (`awaiting`), and run-time statistics (``pipelining.RuntimeStats``) that
  decide what may be pipelined;
- each worker handle's ``current_task`` and ``pipeline`` while it runs
  normal tasks;
- the task's hold on the node's resources (``scheduler.resources``), on its
  bundle's pool, and on its GPUs.

It reads, and updates only as bookkeeping, the worker pool's idle lists
(``pop_idle``/``push_idle``: which connected workers wait for work). It
reads no clock (times come with events), sends nothing, starts and signals
nothing.

The actors created or hosted here are decided on by its actor part
(``actor_life.py``): their creation, their workers' and hosts' deaths, kills,
owners leaving, the node losing its lease.

The worker leases it grants to local processes are decided on by its
lease part (``lease_life.py``): granted or refused, returned, revoked, lost.

The objects it owns or borrows are decided on by its object part
(``object_life.py``, over the directory of ``node/objects.py``): refs taken
and dropped, values put, produced, lost and moved, holders leaving; a value
that becomes ready places the tasks waiting for it in the same call.

What it leaves to collaborators, which hand it their verdicts: the
placement decision itself (``node/cluster.py`` reads the cluster view and
hands the verdict in with `Decided`), the offer to a peer and
placement-group routing (``node/cluster.py``, ``node/placement_groups.py``,
which take tasks back through `Spill`, `Replace` and `Unwait`).

Alternatives considered: callbacks from the daemon into methods that both
decide and act (what this replaced: the decisions could only be tested by
stubbing a daemon); a state object per task with a method per event (spreads
one lifecycle's rules over classes); an asyncio actor per task (every
decision would cost a loop turn on the hottest path).

Safety rests on: `handle` runs to its end on the node's one event loop before
any of its instructions is carried out, and leaves every structure
consistent when it returns; carrying out an instruction may feed a new event
(placing a retried task may start it here), which is therefore safe. Every
retry is spent by :func:`retry_or_fail` alone.
"""
from __future__ import annotations

from meshray import exceptions
from meshray.node import pipelining
from meshray.node.state import messages as m
from meshray.node.objects import ObjectDirectory
from meshray.node.state.actor_life import ActorLife
from meshray.node.state.lease_life import LeaseLife
from meshray.node.state.object_life import ObjectLife
from meshray.node.task_lifecycle import TaskState, move, take_memory_retry, take_retry
from meshray.node.tasks import infeasible_notice
from meshray.scheduler.resources import Allocation, ResourceSet

__all__ = ["NodeState", "NoWorkers", "retry_or_fail", "RETRY", "RETRY_LATER", "FAIL", "CRASHED"]

S = TaskState
# Events too frequent to log, whose effects the log shows anyway (the moves
# they cause). OwnerLeft comes with every closed connection (each worker, each
# CLI call), and almost always changes nothing; the object events come with
# every ref taken or dropped and every value made (a lost copy is logged).
_UNLOGGED = frozenset({m.Schedule, m.OwnerLeft, m.RefsChanged, m.Subscribe, m.Put,
                       m.StreamItem, m.Produced, m.ValueArrived})
# The verdicts of retry_or_fail.
RETRY, RETRY_LATER, FAIL, CRASHED = "retry", "retry later", "fail", "crashed"


def retry_or_fail(task, *, owner_present: bool = True, kill_error=None,
                  oom_delay: float | None = None, crashed: bool = False) -> str:
    """The one rule for a task that did not finish: run it again or not.

    - a cancelled task never runs again (FAIL);
    - killed by the memory monitor with its owner still there: RETRY_LATER,
      a new attempt that spends none of ``max_retries`` (the monitor's own
      limit was checked when it chose to kill);
    - killed on purpose by the node (`kill_error`), or its owner gone: no
      retry -- CRASHED when the loss was a worker's death (the error waits for
      the exit status), else FAIL;
    - otherwise RETRY when a retry is left (spent here), else as above.
    """
    if task.cancelled:
        return FAIL
    if oom_delay is not None and owner_present:
        take_memory_retry(task)
        return RETRY_LATER
    if kill_error is None and owner_present and take_retry(task):
        return RETRY
    return CRASHED if crashed else FAIL


class NoWorkers:
    """The worker pool of a node that serves no workers yet: none is idle."""
    by_id: dict = {}

    @staticmethod
    def pop_idle(_key: str):
        return None

    @staticmethod
    def push_idle(_worker) -> None:
        raise RuntimeError("a worker connected before the node's worker pool exists")


def cancelled_error(task) -> BaseException:
    return task.pg_error or exceptions.TaskCancelledError(task.task_id.hex())


class NodeState:
    """The tasks placed on this node, from the queue to their result.

    `resources` is the node's ``NodeResources``; `queue` its ``TaskQueue``;
    `workers` gives idle workers (``pop_idle(key)``, ``push_idle(worker)``;
    `NoWorkers` until the node serves);
    `bundles` holds placement-group bundle pools (``try_acquire_bundle(task)``,
    ``release_bundle(task)``); `log` is the node's ``EventLog``; `gpu_ids`
    the device ids behind its GPU resource; `objects` its ``ObjectDirectory``.
    """

    def __init__(self, *, resources, queue, bundles, workers=NoWorkers, log=None, gpu_ids=(),
                 tasks=None, actors=None, peer_dead=lambda _node_hex: False, objects=None):
        self.resources = resources
        self.queue = queue
        self.workers = workers
        self.bundles = bundles
        self.log = log
        self.gpu_ids = list(gpu_ids)
        self.awaiting: list = []         # resources taken, waiting for a worker
        self.waiting_on: dict = {}       # object id -> tasks waiting for it as an argument
        self.infeasible: list = []       # tasks that fit no node in the view
        self.runtime_stats = pipelining.RuntimeStats()
        self.draining = False
        self.tasks = {} if tasks is None else tasks      # task id -> record (read)
        self.actors = {} if actors is None else actors   # actor id -> ActorEntry
        self.peer_dead = peer_dead
        self.objects = ObjectDirectory() if objects is None else objects
        self.actor_life = ActorLife(self)
        self.object_life = ObjectLife(self)
        self.lease_life = LeaseLife(self)
        self._handlers = {
            m.Submitted: self._submitted,
            m.Decided: self._decided,
            m.PlaceWhenArgsReady: lambda event, out: self._place_when_args_ready(event.task, out),
            m.ViewChanged: self._view_changed,
            m.MemberAbsent: self._member_absent,
            m.Refused: self._refused,
            m.Schedule: self._schedule,
            m.Offer: self._offer,
            m.Enqueue: lambda event, out: self.queue.push(event.task, event.cause),
            m.Dequeue: lambda event, out: self.queue.remove(event.task),
            m.WorkerReady: self._worker_ready,
            m.WorkerStartFailed: self._worker_start_failed,
            m.TaskReturned: self._task_returned,
            m.WorkerLost: self._worker_lost,
            m.Cancel: self._cancel,
            m.StopRunning: self._stop_running,
            m.Blocked: self._blocked,
            m.Release: self._release_event,
            m.EnvSetupFailed: self._env_setup_failed,
            m.Drain: self._drain,
            m.Fail: self._fail_event,
            **self.actor_life.handlers(),
            **self.object_life.handlers(),
            **self.lease_life.handlers(),
            m.OwnerLeft: self._owner_left,
            m.OwnerNodeDied: self._owner_node_died,
        }

    def handle(self, event) -> list:
        """Apply `event`; return the instructions it calls for, in order."""
        try:
            handler = self._handlers[type(event)]
        except KeyError:
            raise TypeError(f"event={event!r}: expected one of "
                            f"{', '.join(t.__name__ for t in self._handlers)}") from None
        if self.log is not None and type(event) not in _UNLOGGED:
            self.log.handled(event)
        out: list = []
        handler(event, out)
        self.object_life.notices(out)
        return out

    def _move(self, task, new: TaskState, cause: str) -> None:
        move(task, new, cause, self.log)

    # ------------------------------------------------------------ arguments
    def _submitted(self, event: m.Submitted, out: list) -> None:
        self.object_life.submitted(event.task)
        self._place_when_args_ready(event.task, out)

    def _place_when_args_ready(self, task, out: list) -> None:
        is_ready = self.objects.is_ready
        for object_id in task.spec.arg_ref_ids:
            if not is_ready(object_id) and object_id not in task.pending_deps:
                task.pending_deps.add(object_id)
                self.waiting_on.setdefault(object_id, []).append(task)
        if not task.pending_deps:
            out.append(m.Replace(task))

    def objects_ready(self, object_ids: tuple, out: list) -> None:
        """`object_ids` got their values: tasks waiting only for them are placed."""
        waiting_on = self.waiting_on
        if not waiting_on:
            return
        for object_id in object_ids:
            for task in waiting_on.pop(object_id, ()):
                task.pending_deps.discard(object_id)
                if not task.pending_deps and task.state is S.WAITING:
                    out.append(m.Replace(task))

    def _stop_waiting_for_args(self, task) -> None:
        for object_id in task.pending_deps:
            waiters = self.waiting_on.get(object_id)
            if waiters and task in waiters:
                waiters.remove(task)
                if not waiters:
                    del self.waiting_on[object_id]

    # ------------------------------------------------------------ placement's verdicts
    def _decided(self, event: m.Decided, out: list) -> None:
        task, decision = event.task, event.decision
        kind = decision.kind
        if kind == "run_local":
            # Started at once when it fits and nothing of its class waits ahead.
            if not self.queue.has_class(task.sched_class) and self._try_acquire(task):
                self._start(task, event.now, event.wall, out)
            else:
                self.queue.push(task, "placed here (run_local)")
        elif kind in ("wait", "placement_group"):
            self.queue.push(task, f"placed here ({kind})")
        elif kind == "spill":
            out.append(m.Spill(task, list(decision.candidates)))
        elif kind == "unschedulable":
            unknown = getattr(decision, "unknown_node", "")
            if unknown and task.state is S.WAITING and not self.peer_dead(unknown):
                # Its node may have joined after this node's view was last
                # told (the watch lags etcd): etcd decides. Meanwhile it waits
                # as work no node in the view fits, so the view change that
                # shows the node places it again. (A queued task's node was in
                # the view when it was placed: it left.)
                self._move(task, S.INFEASIBLE, f"its node {unknown} is not in the view: "
                                               "asking etcd")
                self.infeasible.append(task)
                out.append(m.ConfirmMember(task, unknown, decision.reason))
            else:
                self._unschedulable(task, decision.reason, out)
        elif kind == "infeasible":
            if not task.infeasible_reported:
                task.infeasible_reported = True
                out.append(m.Notice(task, infeasible_notice(task, getattr(decision, "reason", ""))))
            self._move(task, S.INFEASIBLE, "fits no node in the view")
            self.infeasible.append(task)
        else:
            raise ValueError(f"decision.kind={kind!r}: expected run_local, wait, "
                             "placement_group, spill, unschedulable or infeasible")

    def _unschedulable(self, task, reason: str, out: list) -> None:
        error_cls = (exceptions.ActorUnschedulableError if task.actor is not None
                     else exceptions.TaskUnschedulableError)
        self._fail(task, error_cls(f"{task.spec.name} (id {task.task_id.hex()}) cannot be "
                                   f"scheduled: {reason}"), out)

    def _member_absent(self, event: m.MemberAbsent, out: list) -> None:
        task = event.task
        if task.state is not S.INFEASIBLE or task not in self.infeasible:
            return          # placed again (or ended) since it was asked about
        self.infeasible.remove(task)
        self._unschedulable(task, event.reason, out)

    def _view_changed(self, event: m.ViewChanged, out: list) -> None:
        waiting, self.infeasible = self.infeasible, []
        for task in waiting:
            if not task.cancelled:
                task.refused_by.clear()
                self._move(task, S.WAITING, "placed again: the cluster view changed")
                out.append(m.Replace(task))

    def _refused(self, event: m.Refused, out: list) -> None:
        task = event.task
        task.refused_by.add(event.node_hex)
        if task.spill_candidates:
            out.append(m.Spill(task, task.spill_candidates))
        else:
            # Everyone was busy: wait here; the peer duties offer it again as
            # the view shows room somewhere.
            task.refused_by.clear()
            self.queue.push(task, "every candidate peer refused it")

    # ------------------------------------------------------------ starting
    def _schedule(self, event: m.Schedule, out: list) -> None:
        if self.draining:
            return
        waiting = False
        for _key, tasks in self.queue.heads():
            while tasks:
                task = tasks[0]
                if not self._try_acquire(task):
                    waiting = True
                    break
                tasks.popleft()
                self._start(task, event.now, event.wall, out)
        if waiting:
            # Out of room: short tasks may still queue behind running ones.
            for worker in self._busy_workers():
                if len(worker.pipeline) < pipelining.PIPELINE_DEPTH - 1:
                    self._top_up_pipeline(worker, event.now, out)

    def _busy_workers(self):
        """Workers running a normal task (which may get short tasks behind it)."""
        for worker in list(self.workers.by_id.values()):
            if worker.current_task is not None and worker.actor is None:
                yield worker

    def _offer(self, event: m.Offer, out: list) -> None:
        task = event.task
        if self._try_acquire(task):
            self._start(task, event.now, event.wall, out)
        elif event.backlog:
            self.queue.push(task, "accepted from a peer for the backlog")

    def _try_acquire(self, task) -> bool:
        """Take `task`'s resources (from its bundle, or the node's pool) if they are free."""
        if task.bundle is not None:
            if not self.bundles.try_acquire_bundle(task):
                return False
            if task.bundle_gpu_ids:
                self._assign_devices(task, task.bundle_gpu_ids)
            return True
        # An actor must fit its placement request but only holds `hold`.
        if task.hold is not task.request and not self.resources.can_fit(task.request):
            return False
        if self.gpu_ids and task.hold.get("GPU"):
            allocation = self.resources.allocate(task.hold)
            if allocation is None:
                return False
            task.allocation = allocation
            self._assign_devices(task, allocation.instances.get("GPU", ()))
            return True
        return self.resources.try_acquire(task.hold)

    @staticmethod
    def _assign_devices(task, gpu_ids) -> None:
        """Pin the task's worker to its GPUs; such workers serve only that assignment."""
        from meshray.accelerators.nvidia import visible_devices_env
        task.gpu_ids = [str(i) for i in gpu_ids]
        extra = visible_devices_env(gpu_ids)
        if extra:
            task.worker_env = {**task.env_vars, **extra}
            task.worker_key = f"{task.env_key}|gpu:{','.join(task.gpu_ids)}"

    def _start(self, task, now: float, wall: float, out: list) -> None:
        """`task`'s resources are taken: hand it to a worker (one is started when none is idle)."""
        task.acquired = True
        if task.spec.arg_ref_ids or task.remote_args:
            out.append(m.Prefetch(task))
        worker = self.workers.pop_idle(task.worker_key)
        if worker is None:
            self._move(task, S.ASSIGNED, "resources taken; waiting for a worker")
            self.awaiting.append(task)
            self._ensure_workers(task, out)
        else:
            self._dispatch(task, worker, now, wall, out)

    def _ensure_workers(self, task, out: list) -> None:
        key = task.worker_key
        out.append(m.EnsureWorkers(task, sum(1 for t in self.awaiting if t.worker_key == key)))

    def _dispatch(self, task, worker, now: float, wall: float, out: list) -> None:
        self._move(task, S.RUNNING, f"sent to worker {worker.pid}")
        task.worker = worker
        task.started_at = now
        worker.current_task = task
        task.started_wall, task.ran_on = wall, (worker.worker_id, worker.pid)
        if task.actor is not None:
            worker.actor = task.actor
            task.actor.worker, task.actor.pid = worker, worker.pid
        out.append(m.Execute(task, worker))
        self._top_up_pipeline(worker, now, out)

    def _top_up_pipeline(self, worker, now: float, out: list) -> None:
        """Queue short tasks of the running one's class on its worker (pipelining.py)."""
        leader = worker.current_task
        if leader is None or not pipelining.can_lead(leader, self.runtime_stats):
            return
        while len(worker.pipeline) < pipelining.PIPELINE_DEPTH - 1:
            follower = self.queue.pop_matching_head(
                leader.sched_class,
                lambda t: pipelining.can_follow(leader, t, self.runtime_stats))
            if follower is None:
                return
            self._move(follower, S.RUNNING, f"pipelined behind a task on worker {worker.pid}")
            follower.worker = worker
            worker.pipeline.append(follower)
            if follower.spec.arg_ref_ids:     # (a follower never came with its values)
                out.append(m.Prefetch(follower))
            out.append(m.Execute(follower, worker))

    # ------------------------------------------------------------ workers
    def _worker_ready(self, event: m.WorkerReady, out: list) -> None:
        self._worker_free(event.worker, event.now, event.wall, out)

    def _worker_free(self, worker, now: float, wall: float, out: list) -> None:
        """`worker` has nothing to run: the next task waiting for a worker of
        its kind, or the idle list (also when a lease on it ends)."""
        for index, task in enumerate(self.awaiting):
            if task.worker_key == worker.env_key:
                del self.awaiting[index]
                self._dispatch(task, worker, now, wall, out)
                return
        worker.current_task = None
        self.workers.push_idle(worker)

    worker_free = _worker_free

    def _worker_start_failed(self, event: m.WorkerStartFailed, out: list) -> None:
        for task in self.awaiting:
            if task.worker_key == event.worker_key:
                self._ensure_workers(task, out)
                return

    def _blocked(self, event: m.Blocked, out: list) -> None:
        if self.lease_life.blocked(event.worker, event.blocked):
            return
        task = event.worker.current_task
        if task is None or not task.acquired or task.bundle is not None:
            return
        cpu = ResourceSet.from_dict({"CPU": task.hold.get("CPU", 0.0)})
        if event.blocked and not task.cpu_lent and not cpu.is_empty():
            self.resources.release(cpu)
            task.cpu_lent = True
        elif not event.blocked and task.cpu_lent and self.resources.try_acquire(cpu):
            # When the CPU is taken meanwhile the task runs on without it (a
            # brief oversubscription) rather than deadlock waiting for it.
            task.cpu_lent = False

    def _drain(self, event: m.Drain, out: list) -> None:
        self.draining = True

    # ------------------------------------------------------------ results
    def _task_returned(self, event: m.TaskReturned, out: list) -> None:
        worker, task = event.worker, event.task
        if worker.current_task is task:
            self.runtime_stats.observe(task.spec.function_id, event.now - task.started_at)
        elif task in worker.pipeline:
            # The task it followed was dropped here without its result.
            worker.pipeline.remove(task)
        if not self._promote_follower(worker, task, event.now, event.wall, out):
            self._release(task)
            self._worker_free(worker, event.now, event.wall, out)
        if event.retryable and retry_or_fail(task) == RETRY:
            self._move(task, S.WAITING, "retry: the task raised a retryable error")
            out.append(m.Replace(task))
            return
        out.append(m.Finish(task, event.values))

    def _promote_follower(self, worker, done, now: float, wall: float, out: list) -> bool:
        """The worker moved on to its next pipelined task: it inherits `done`'s resources."""
        if not worker.pipeline:
            return False
        follower = worker.pipeline.popleft()
        if done.acquired and not done.cpu_lent and done.allocation is None:
            follower.acquired, done.acquired = True, False
        else:
            self._release(done)
            follower.acquired = self.resources.try_acquire(follower.hold)
        done.worker = None
        worker.current_task = follower
        follower.started_at = now
        follower.started_wall, follower.ran_on = wall, (worker.worker_id, worker.pid)
        self._top_up_pipeline(worker, now, out)
        return True

    def _worker_lost(self, event: m.WorkerLost, out: list) -> None:
        worker = event.worker
        self.lease_life.worker_lost(worker, out)
        task = worker.current_task
        if not self._reports_crash(worker, task, event.owner_present):
            # Killed now: it must not run on beside a retry. A task that fails
            # for good instead waits for its worker's real exit status.
            out.append(m.KillWorker(worker))
        if worker.actor is not None:
            self.actor_life.worker_died(worker, out)
            return
        while worker.pipeline:
            # Sent to run after the current task; never reported: place again
            # (only tasks with a retry budget are ever pipelined).
            follower = worker.pipeline.popleft()
            follower.worker = None
            if follower.cancelled:
                self._fail(follower, cancelled_error(follower), out)
            else:
                self._move(follower, S.WAITING, "placed again: its worker died before it ran")
                out.append(m.Replace(follower))
        task = worker.current_task
        if task is None:
            return
        self._release(task)
        if task.pg_dropped:
            self._group_task_lost(task, event.group_gone, out)
            return
        verdict = retry_or_fail(task, owner_present=event.owner_present,
                                kill_error=worker.kill_error, oom_delay=worker.oom_retry_in,
                                crashed=True)
        if verdict == FAIL:                  # cancelled
            self._failed(task, cancelled_error(task), out)
        elif verdict == RETRY_LATER:
            delay = worker.oom_retry_in
            self._move(task, S.WAITING,
                       f"retry in {delay:g} s: the memory monitor killed worker {worker.pid}")
            out.append(m.ReplaceLater(task, delay))
        elif verdict == RETRY:
            self._move(task, S.WAITING, f"retry: worker {worker.pid} died running it")
            out.append(m.Replace(task))
        else:
            # No longer running; finished once the exit status is in.
            self._move(task, S.CRASHED, f"worker {worker.pid} died; no retries left")
            out.append(m.ReportCrash(task, worker))

    def _group_task_lost(self, task, group_gone: bool, out: list) -> None:
        """A group task's worker was killed because its bundle left: fail or re-route."""
        task.pg_dropped = False
        task.bundle = None
        if group_gone:
            out.append(m.GroupRemoved(task))
        elif take_retry(task):
            self._move(task, S.WAITING, "retry: its placement-group bundle moved")
            out.append(m.Replace(task))
        else:
            self._failed(task, exceptions.WorkerCrashedError(
                f"task {task.spec.name} (id {task.task_id.hex()}) lost its placement-group "
                "bundle and has no retries left"), out)

    @staticmethod
    def _reports_crash(worker, task, owner_present: bool) -> bool:
        """Whether losing `worker` fails `task` for good (so its process is left
        to exit and report why) rather than retrying it (mirrors _worker_lost)."""
        if worker.actor is not None or task is None or task.pg_dropped or task.cancelled:
            return False
        if worker.kill_error is not None:
            return True
        retries = worker.oom_retry_in is not None or task.retries_left != 0
        return not (retries and owner_present)

    def _env_setup_failed(self, event: m.EnvSetupFailed, out: list) -> None:
        taken = [t for t in self.awaiting if t.worker_key == event.worker_key]
        for task in taken:
            self.awaiting.remove(task)
            self._fail(task, event.error, out)

    # ------------------------------------------------------------ cancel
    def _cancel(self, event: m.Cancel, out: list) -> None:
        task = event.task
        if task.state is S.DONE or task.cancelled:
            return
        task.cancelled = True
        state = task.state
        if state is S.RUNNING:
            out.append(m.KillWorker(task.worker) if event.force else m.KillTask(task, task.worker))
        elif state is S.SPILLED:
            out.append(m.CancelRemote(task, event.force, event.recursive))
        elif state is S.CRASHED:
            return                            # fails once its exit status is in
        else:
            if state is S.QUEUED:
                self.queue.remove(task)
            elif state is S.ASSIGNED:
                if task in self.awaiting:
                    self.awaiting.remove(task)
            elif state is S.WAITING:
                self._stop_waiting_for_args(task)
            elif state is S.INFEASIBLE:
                if task in self.infeasible:
                    self.infeasible.remove(task)
            else:                             # WAITING_GROUP
                out.append(m.Unwait(task, state))
            self._fail(task, exceptions.TaskCancelledError(task.task_id.hex()), out)

    def _stop_running(self, event: m.StopRunning, out: list) -> None:
        task = event.task
        if event.why == "bundle_left":
            task.pg_dropped = True
        elif event.why == "cancelled":
            task.cancelled = True
        else:
            raise ValueError(f"why={event.why!r}: expected 'cancelled' or 'bundle_left'")
        if task.worker is not None:
            out.append(m.KillWorker(task.worker))     # WorkerLost decides what follows

    # ------------------------------------------------------------ releasing
    def _fail(self, task, error: BaseException, out: list) -> None:
        self._release(task)
        self._failed(task, error, out)

    def _failed(self, task, error: BaseException, out: list) -> None:
        """`task` (its resources given back) fails with `error`; an actor it
        was creating does not start."""
        if task.actor is not None:
            self.actor_life.start_failed(task.actor, error, out)
        out.append(m.FailTask(task, error))

    def _fail_event(self, event: m.Fail, out: list) -> None:
        self.release(event.task)
        self._failed(event.task, event.error, out)

    def _owner_left(self, event: m.OwnerLeft, out: list) -> None:
        self.lease_life.holder_left(event.owner.conn_id, out)
        self.object_life.holder_gone(event.owner.conn_id, out)
        self.actor_life.owner_left(event, out)

    def _owner_node_died(self, event: m.OwnerNodeDied, out: list) -> None:
        self.object_life.node_gone(event.node_hex, out)
        self.actor_life.owner_node_died(event, out)

    def _release_event(self, event: m.Release, out: list) -> None:
        self.release(event.task)

    def release(self, task) -> None:
        """`task` leaves the node's bookkeeping: its place in line or in the
        wait for a worker, its resources, its worker."""
        if task.state is S.ASSIGNED and task in self.awaiting:
            self.awaiting.remove(task)
        elif task.state is S.QUEUED:
            self.queue.remove(task)
        self._release(task)

    def cancel(self, task, out: list) -> None:
        """Cancel `task` (not forced, not its children): as the `Cancel` event."""
        self._cancel(m.Cancel(task, False, False), out)

    def adopt(self, task, worker) -> None:
        """The actor `task` created keeps `worker` and the resources the task took."""
        if worker.current_task is task:
            worker.current_task = None
        task.worker = None
        task.acquired = False
        task.allocation = None

    def _release(self, task) -> None:
        """Give back `task`'s resources (or its bundle's share); it leaves its worker."""
        if task.acquired and task.bundle is not None:
            self.bundles.release_bundle(task)
            task.acquired = False
        if task.acquired:
            lent = ResourceSet.from_dict({"CPU": task.hold.get("CPU", 0.0)}) \
                if task.cpu_lent else ResourceSet()
            if task.allocation is not None:
                allocation = task.allocation
                if task.cpu_lent:
                    allocation = Allocation(allocation.resources - lent, allocation.instances)
                self.resources.release(allocation)
                task.allocation = None
            else:
                self.resources.release(task.hold - lent)
            task.acquired = task.cpu_lent = False
        worker = task.worker
        if worker is not None:
            if worker.current_task is task:
                worker.current_task = None
            elif task in worker.pipeline:
                worker.pipeline.remove(task)
            task.worker = None
