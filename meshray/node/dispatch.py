"""Handing queued tasks to workers: the part of the daemon that runs the dispatch loop.

A task whose resources are acquired goes to an idle worker of its
environment (one is started when none is idle); short tasks of one class may
also be queued on a busy worker behind its running task (pipelining.py), in
which case they take over that task's resources when it finishes.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from meshray.node import pipelining
from meshray.node.task_lifecycle import TaskState
from meshray.rpc.generated import meshray_pb2 as pb
from meshray.scheduler.resources import Allocation, ResourceSet

if TYPE_CHECKING:
    from meshray.node.tasks import TaskRecord
    from meshray.node.worker_pool import WorkerProcess

__all__ = ["TaskDispatch"]


class TaskDispatch:
    """Takes resources for queued tasks and hands them to workers.

    It owns the tasks whose resources are taken but that wait for a worker
    (`awaiting_worker`) and the run times pipelining judges tasks by
    (`runtime_stats`), so a worker that connects or frees up finds its next
    task here. It is given the node because what it hands out belongs to
    the node and changes as it runs: the queue, resources and bundle pools,
    the worker pool (which exists once the node serves), runtime
    environments, argument prefetching, the function table, and the moves of
    the task lifecycle the node owns.
    """

    def __init__(self, node):
        self._node = node
        self.awaiting_worker: list[TaskRecord] = []
        self.runtime_stats = pipelining.RuntimeStats()

    def schedule(self) -> None:
        """Dispatch queued tasks while resources and workers allow (none while draining)."""
        node = self._node
        if node.drain.draining:
            return
        if node.placement.bundles:
            node.placement.take_bundles()
        waiting = False
        for _key, tasks in node.queue.heads():
            while tasks:
                task = tasks[0]
                if not self.try_acquire(task):
                    waiting = True
                    break
                tasks.popleft()
                self.start(task)
        if waiting:
            # Out of room: short tasks may still queue behind running ones.
            for worker in node.pool.by_id.values():
                if worker.current_task is not None and worker.actor is None \
                        and len(worker.pipeline) < pipelining.PIPELINE_DEPTH - 1:
                    self._top_up_pipeline(worker)

    def start(self, task: TaskRecord) -> None:
        """Hand a task whose resources are acquired to a worker (starting one if needed)."""
        node = self._node
        task.acquired = True
        node.transfer.prefetch_args(task)
        worker = node.pool.pop_idle(task.worker_key)
        if worker is None:
            node._move(task, TaskState.ASSIGNED, "resources taken; waiting for a worker")
            self.awaiting_worker.append(task)
            self._ensure_workers(task)
        else:
            self._dispatch(task, worker)

    def try_acquire(self, task: TaskRecord) -> bool:
        """Take `task`'s resources (from its bundle, or the node's pool) if they are free."""
        node = self._node
        if task.bundle is not None:
            return node.placement.try_acquire_bundle(task)
        # An actor must fit its placement request but only holds `hold`.
        if task.hold is not task.request and not node.resources.can_fit(task.request):
            return False
        if node.config.gpu_ids and task.hold.get("GPU"):
            allocation = node.resources.allocate(task.hold)
            if allocation is None:
                return False
            task.allocation = allocation
            self.assign_devices(task, allocation.instances.get("GPU", ()))
            return True
        return node.resources.try_acquire(task.hold)

    def assign_devices(self, task: TaskRecord, gpu_ids) -> None:
        """Pin the task's worker to its GPUs; such workers serve only that assignment."""
        from meshray.accelerators.nvidia import visible_devices_env
        task.gpu_ids = [str(i) for i in gpu_ids]
        extra = visible_devices_env(gpu_ids)
        if extra:
            task.worker_env = {**task.env_vars, **extra}
            task.worker_key = f"{task.env_key}|gpu:{','.join(task.gpu_ids)}"

    def _ensure_workers(self, task: TaskRecord) -> None:
        key = task.worker_key
        wanted = sum(1 for t in self.awaiting_worker if t.worker_key == key)
        missing = wanted - self._node.pool.starting.get(key, 0)
        if missing > 0:
            self._node.envs.start_workers_for(task, missing)

    def worker_free(self, worker: WorkerProcess) -> None:
        """`worker` connected or finished: it takes the next task waiting for its kind."""
        for index, task in enumerate(self.awaiting_worker):
            if task.worker_key == worker.env_key:
                del self.awaiting_worker[index]
                self._dispatch(task, worker)
                return
        self._node.pool.push_idle(worker)

    def worker_start_failed(self, worker_key: str) -> None:
        """A worker for `worker_key` exited before connecting: start another if tasks wait."""
        for task in self.awaiting_worker:
            if task.worker_key == worker_key:
                self._ensure_workers(task)
                return

    def drop_awaiting(self, task: TaskRecord) -> None:
        """`task` no longer waits for a worker (cancelled, or its owner is gone)."""
        if task in self.awaiting_worker:
            self.awaiting_worker.remove(task)

    def take_awaiting(self, worker_key: str) -> list:
        """Remove and return the tasks waiting for a worker of `worker_key`."""
        taken = [t for t in self.awaiting_worker if t.worker_key == worker_key]
        for task in taken:
            self.awaiting_worker.remove(task)
        return taken

    def _dispatch(self, task: TaskRecord, worker: WorkerProcess) -> None:
        self._node._move(task, TaskState.RUNNING, f"sent to worker {worker.pid}")
        task.worker = worker
        task.started_at = time.monotonic()
        worker.current_task = task
        task.started_wall, task.ran_on = time.time(), (worker.worker_id, worker.pid)
        if task.actor is not None:
            worker.actor = task.actor
            task.actor.worker, task.actor.pid = worker, worker.pid
        self._send_execute(task, worker)
        self._top_up_pipeline(worker)

    def _top_up_pipeline(self, worker: WorkerProcess) -> None:
        """Queue short tasks of the running one's class on its worker (pipelining.py)."""
        leader = worker.current_task
        if leader is None or not pipelining.can_lead(leader, self.runtime_stats):
            return
        while len(worker.pipeline) < pipelining.PIPELINE_DEPTH - 1:
            follower = self._node.queue.pop_matching_head(
                leader.sched_class,
                lambda t: pipelining.can_follow(leader, t, self.runtime_stats))
            if follower is None:
                return
            self._node._move(follower, TaskState.RUNNING,
                             f"pipelined behind a task on worker {worker.pid}")
            follower.worker = worker
            worker.pipeline.append(follower)
            self._node.transfer.prefetch_args(follower)
            self._send_execute(follower, worker)

    def _send_execute(self, task: TaskRecord, worker: WorkerProcess) -> None:
        node = self._node
        spec = task.spec
        execute = pb.ExecuteTask(spec=spec)
        if spec.function_id not in worker.functions_sent:
            execute.function_pickled = node.functions.get(spec.function_id, b"")
            worker.functions_sent.add(spec.function_id)
        if task.remote_args is not None:
            execute.args.extend(task.remote_args)
        else:
            for object_id in spec.arg_ref_ids:
                execute.args.append(node.peers.exportable(node.objects.get(object_id)))
        execute.assigned_gpu_ids.extend(task.gpu_ids)
        worker.conn.send(pb.ServerEvent(execute=execute))

    def task_returned(self, worker: WorkerProcess, task: TaskRecord) -> None:
        """`worker` sent `task`'s result: note its run time, and hand the worker
        (with `task`'s resources, when a pipelined task follows) to what is next."""
        if worker.current_task is task:
            self.runtime_stats.observe(task.spec.function_id,
                                       time.monotonic() - task.started_at)
        elif task in worker.pipeline:
            # The task it followed was dropped here without its result.
            worker.pipeline.remove(task)
        if not self._promote_follower(worker, task):
            self.release(task)
            self.worker_free(worker)

    def _promote_follower(self, worker: WorkerProcess, done: TaskRecord) -> bool:
        """The worker moved on to its next pipelined task: it inherits `done`'s resources."""
        if not worker.pipeline:
            return False
        follower = worker.pipeline.popleft()
        if done.acquired and not done.cpu_lent and done.allocation is None:
            follower.acquired, done.acquired = True, False
        else:
            self.release(done)
            follower.acquired = self._node.resources.try_acquire(follower.hold)
        done.worker = None
        worker.current_task = follower
        follower.started_at = time.monotonic()
        follower.started_wall, follower.ran_on = time.time(), (worker.worker_id, worker.pid)
        self._top_up_pipeline(worker)
        return True

    def release(self, task: TaskRecord) -> None:
        """Give back `task`'s resources (or its bundle's share); it leaves its worker."""
        node = self._node
        if task.acquired and task.bundle is not None:
            node.placement.release_bundle(task)
            task.acquired = False
        if task.acquired:
            lent = ResourceSet.from_dict({"CPU": task.hold.get("CPU", 0.0)}) \
                if task.cpu_lent else ResourceSet()
            if task.allocation is not None:
                allocation = task.allocation
                if task.cpu_lent:
                    allocation = Allocation(allocation.resources - lent, allocation.instances)
                node.resources.release(allocation)
                task.allocation = None
            else:
                node.resources.release(task.hold - lent)
            task.acquired = task.cpu_lent = False
        if task.worker is not None:
            if task.worker.current_task is task:
                task.worker.current_task = None
            elif task in task.worker.pipeline:
                task.worker.pipeline.remove(task)
            task.worker = None
