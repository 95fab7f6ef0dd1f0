"""The dispatch loop (node/dispatch.py), acting on a stand-in node.

TaskDispatch is given the node whose queue, resources and worker pool it
hands out; here that node's pool and workers are recorders, so these tests
check who runs what: queued tasks start while CPUs last, a task with no idle
worker waits for the next one that connects, a draining node starts
nothing, a returned task gives its CPU and worker back, and a short task
pipelined behind a running one inherits its CPU when that one returns.
"""
from __future__ import annotations

from types import SimpleNamespace

from meshray.node.dispatch import TaskDispatch
from meshray.node.task_lifecycle import TaskState, move
from meshray.node.tasks import TaskQueue, TaskRecord
from meshray.node.worker_pool import WorkerProcess
from meshray.rpc.generated import meshray_pb2 as pb
from meshray.scheduler.resources import NodeResources

FUNCTION = b"\x0f" * 8


class _Pool:
    """The worker pool's idle lists and start counts."""

    def __init__(self):
        self.by_id, self.idle, self.starting = {}, {}, {}

    def pop_idle(self, env_key):
        workers = self.idle.get(env_key)
        return workers.pop() if workers else None

    def push_idle(self, worker):
        worker.current_task = None
        self.idle.setdefault(worker.env_key, []).append(worker)


class _Node:
    """What TaskDispatch reads and calls on its node, recorded."""

    def __init__(self, cpus: float):
        self.drain = SimpleNamespace(draining=False)
        self.placement = SimpleNamespace(bundles={})
        self.queue = TaskQueue()
        self.pool = _Pool()
        self.resources = NodeResources({"CPU": cpus})
        self.config = SimpleNamespace(gpu_ids=[])
        self.functions = {FUNCTION: b"pickled"}
        self.objects = {}
        self.worker_starts = []
        self.envs = SimpleNamespace(start_workers_for=lambda task, n: self.worker_starts.append(
            (task, n)))
        self.transfer = SimpleNamespace(prefetch_args=lambda task: None)
        self.peers = SimpleNamespace(exportable=lambda value: value)
        self.owner = SimpleNamespace(conn_id=1)

    def _move(self, task, new, cause):
        move(task, new, cause)

    def worker(self, pid: int) -> WorkerProcess:
        worker = WorkerProcess(worker_id=bytes([pid]) * 4, env_key="default",
                               process=SimpleNamespace(pid=pid))
        worker.conn = SimpleNamespace(sent=[])
        worker.conn.send = worker.conn.sent.append
        self.pool.by_id[worker.worker_id] = worker
        return worker

    def queued(self, count: int) -> list:
        tasks = []
        for i in range(count):
            spec = pb.TaskSpec(task_id=bytes([i + 1]) * 4, name=f"t{i}", function_id=FUNCTION,
                               resources={"CPU": 1.0}, num_returns=1, max_retries=3)
            task = TaskRecord.from_spec(spec, self.owner, "default", return_ids=[])
            self.queue.push(task, "test: queued here")
            tasks.append(task)
        return tasks


def _free_cpus(node) -> float:
    return node.resources.available.get("CPU", 0.0)


def _executed(worker) -> list:
    return [event.execute.spec.task_id for event in worker.conn.sent]


def test_queued_tasks_start_while_cpus_last_and_one_without_a_worker_waits_for_the_next():
    node = _Node(cpus=2.0)
    dispatch = TaskDispatch(node)
    first = node.worker(101)
    node.pool.push_idle(first)
    one, two, three = node.queued(3)

    dispatch.schedule()

    assert one.state == TaskState.RUNNING and _executed(first) == [one.task_id]
    assert first.conn.sent[0].execute.function_pickled == b"pickled"
    assert two.state == TaskState.ASSIGNED and dispatch.awaiting_worker == [two]
    assert node.worker_starts == [(two, 1)]          # one worker started for it
    assert three.state == TaskState.QUEUED and list(node.queue) == [three]
    assert _free_cpus(node) == 0.0

    second = node.worker(102)
    dispatch.worker_free(second)                     # it connected: it takes `two`
    assert _executed(second) == [two.task_id] and dispatch.awaiting_worker == []
    assert two.state == TaskState.RUNNING and second.current_task is two


def test_a_draining_node_starts_nothing():
    node = _Node(cpus=2.0)
    dispatch = TaskDispatch(node)
    node.pool.push_idle(node.worker(101))
    node.drain.draining = True
    (task,) = node.queued(1)
    dispatch.schedule()
    assert task.state == TaskState.QUEUED and _free_cpus(node) == 2.0


def test_a_returned_task_gives_its_cpu_and_worker_back():
    node = _Node(cpus=1.0)
    dispatch = TaskDispatch(node)
    worker = node.worker(101)
    node.pool.push_idle(worker)
    (task,) = node.queued(1)
    dispatch.schedule()
    assert worker.current_task is task

    dispatch.task_returned(worker, task)

    assert _free_cpus(node) == 1.0
    assert not task.acquired and task.worker is None
    assert node.pool.idle["default"] == [worker] and worker.current_task is None


def test_a_pipelined_short_task_inherits_the_cpu_of_the_one_it_followed():
    node = _Node(cpus=1.0)
    dispatch = TaskDispatch(node)
    for _ in range(3):
        dispatch.runtime_stats.observe(FUNCTION, 0.0001)    # known to be short
    worker = node.worker(101)
    node.pool.push_idle(worker)
    leader, follower = node.queued(2)

    dispatch.schedule()

    assert _executed(worker) == [leader.task_id, follower.task_id]
    assert follower.state == TaskState.RUNNING and list(worker.pipeline) == [follower]
    assert not follower.acquired and len(node.queue) == 0

    dispatch.task_returned(worker, leader)

    assert worker.current_task is follower and follower.acquired and not leader.acquired
    assert _free_cpus(node) == 0.0    # still held, by the follower
