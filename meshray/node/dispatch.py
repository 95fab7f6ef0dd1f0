"""Handing queued tasks to workers, as a mixin of NodeDaemon.

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
    """Mixed into NodeDaemon."""

    def _enqueue(self, task: TaskRecord) -> None:
        self._place_or_queue(task)

    def _schedule(self) -> None:
        """Dispatch queued tasks while resources and workers allow (none while draining)."""
        if self.drain.draining:
            return
        if self.placement.bundles:
            self.placement.take_bundles()
        waiting = False
        for _key, tasks in self.queue.heads():
            while tasks:
                task = tasks[0]
                if not self._try_acquire(task):
                    waiting = True
                    break
                tasks.popleft()
                self._start(task)
        if waiting:
            # Out of room: short tasks may still queue behind running ones.
            for worker in self.pool.by_id.values():
                if worker.current_task is not None and worker.actor is None \
                        and len(worker.pipeline) < pipelining.PIPELINE_DEPTH - 1:
                    self._top_up_pipeline(worker)

    def _start(self, task: TaskRecord) -> None:
        """Hand a task whose resources are acquired to a worker (starting one if needed)."""
        task.acquired = True
        self.transfer.prefetch_args(task)
        worker = self.pool.pop_idle(task.worker_key)
        if worker is None:
            self._move(task, TaskState.ASSIGNED, "resources taken; waiting for a worker")
            self.awaiting_worker.append(task)
            self._ensure_workers(task)
        else:
            self._dispatch(task, worker)

    def _try_acquire(self, task: TaskRecord) -> bool:
        if task.bundle is not None:
            return self.placement.try_acquire_bundle(task)
        # An actor must fit its placement request but only holds `hold`.
        if task.hold is not task.request and not self.resources.can_fit(task.request):
            return False
        if self.config.gpu_ids and task.hold.get("GPU"):
            allocation = self.resources.allocate(task.hold)
            if allocation is None:
                return False
            task.allocation = allocation
            self._assign_devices(task, allocation.instances.get("GPU", ()))
            return True
        return self.resources.try_acquire(task.hold)

    def _assign_devices(self, task: TaskRecord, gpu_ids) -> None:
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
        missing = wanted - self.pool.starting.get(key, 0)
        if missing > 0:
            self.envs.start_workers_for(task, missing)

    def _worker_free(self, worker: WorkerProcess) -> None:
        for index, task in enumerate(self.awaiting_worker):
            if task.worker_key == worker.env_key:
                del self.awaiting_worker[index]
                self._dispatch(task, worker)
                return
        self.pool.push_idle(worker)

    def _dispatch(self, task: TaskRecord, worker: WorkerProcess) -> None:
        self._move(task, TaskState.RUNNING, f"sent to worker {worker.pid}")
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
            follower = self.queue.pop_matching_head(
                leader.sched_class,
                lambda t: pipelining.can_follow(leader, t, self.runtime_stats))
            if follower is None:
                return
            self._move(follower, TaskState.RUNNING, f"pipelined behind a task on worker {worker.pid}")
            follower.worker = worker
            worker.pipeline.append(follower)
            self.transfer.prefetch_args(follower)
            self._send_execute(follower, worker)

    def _send_execute(self, task: TaskRecord, worker: WorkerProcess) -> None:
        spec = task.spec
        execute = pb.ExecuteTask(spec=spec)
        if spec.function_id not in worker.functions_sent:
            execute.function_pickled = self.functions.get(spec.function_id, b"")
            worker.functions_sent.add(spec.function_id)
        if task.remote_args is not None:
            execute.args.extend(task.remote_args)
        else:
            for object_id in spec.arg_ref_ids:
                execute.args.append(self._exportable(self.objects.get(object_id)))
        execute.assigned_gpu_ids.extend(task.gpu_ids)
        worker.conn.send(pb.ServerEvent(execute=execute))

    def _promote_follower(self, worker: WorkerProcess, done: TaskRecord) -> bool:
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
        follower.started_at = time.monotonic()
        follower.started_wall, follower.ran_on = time.time(), (worker.worker_id, worker.pid)
        self._top_up_pipeline(worker)
        return True

    def _release(self, task: TaskRecord) -> None:
        if task.acquired and task.bundle is not None:
            self.placement.release_bundle(task)
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
        if task.worker is not None:
            if task.worker.current_task is task:
                task.worker.current_task = None
            elif task in task.worker.pipeline:
                task.worker.pipeline.remove(task)
            task.worker = None
