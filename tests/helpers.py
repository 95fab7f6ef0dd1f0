"""Helpers the tests share: waiting on conditions, running driver scripts, a
node state machine over plain bookkeeping."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

from meshray.node.actors import ActorEntry
from meshray.node.state import NodeState
from meshray.node.state import messages as m
from meshray.node.task_lifecycle import TaskState as S
from meshray.node.tasks import TaskQueue, TaskRecord
from meshray.node.worker_pool import WorkerProcess
from meshray.rpc.generated import meshray_pb2 as pb
from meshray.scheduler.resources import NodeResources, ResourceSet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def process_gone(pid: int) -> bool:
    """Whether process `pid` has exited (gone, or a zombie nobody reaped yet).
    One look: a process that exits between two looks must not raise."""
    import psutil
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@contextlib.contextmanager
def relay_to(port: int):
    """An impostor on another loopback port that forwards one connection's
    bytes both ways to `port`; yields its own port (for tests that a proof
    names the address its maker dialled)."""
    relay = socket.create_server(("127.0.0.1", 0))

    def forward(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def run():
        try:
            client, _ = relay.accept()
        except OSError:
            return
        upstream = socket.create_connection(("127.0.0.1", port))
        threads = [threading.Thread(target=forward, args=pair, daemon=True)
                   for pair in ((client, upstream), (upstream, client))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        client.close()
        upstream.close()

    relaying = threading.Thread(target=run, daemon=True)
    relaying.start()
    try:
        yield relay.getsockname()[1]
    finally:
        try:
            relay.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        relay.close()
        relaying.join(10)


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05, message: str = ""):
    """Poll `predicate` until it is truthy or the deadline passes (then fail)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s: {message or predicate}")


def run_python(args: list, timeout: float = 60.0, env=None) -> subprocess.CompletedProcess:
    """Run `python *args` in a fresh interpreter and return its outcome.

    Past `timeout` the process is sent SIGABRT with Python's fault handler on,
    so the failure shows where every one of its threads was stuck (a hang
    explains itself instead of only saying that it took too long).
    """
    env = dict(os.environ if env is None else env, PYTHONFAULTHANDLER="1")
    with subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=REPO, env=env) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)
            try:
                out, err = process.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                out, err = process.communicate()
            raise AssertionError(
                f"python {' '.join(map(str, args))[:200]} still running after {timeout}s; "
                f"its threads when stopped:\n{err[-12000:]}\nits stdout:\n{out[-2000:]}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def run_driver(code: str, timeout: float = 60.0, env=None) -> subprocess.CompletedProcess:
    """Run a driver script in a fresh interpreter and return its outcome."""
    return run_python(["-c", code], timeout=timeout, env=env)


class RecordingDispatch:
    """A node's `dispatch` for unit tests of the parts around it: the real
    state machine (`NodeState`, on the node's own queue and resources), with
    the events it was handed and the instructions it returned kept. An
    instruction is carried out only by what a test puts in `carry_out`
    (instruction type -> callable). `schedules` counts the times the node was
    asked to start what fits."""

    def __init__(self, queue, resources=None, bundles=None):
        self.machine = NodeState(resources=resources or NodeResources({"CPU": 0.0}),
                                 queue=queue, bundles=bundles)
        self.events, self.instructions = [], []
        self.carry_out: dict = {}
        self.schedules = 0

    def handle(self, event) -> None:
        self.events.append(event)
        for instruction in self.machine.handle(event):
            self.instructions.append(instruction)
            carry_out = self.carry_out.get(type(instruction))
            if carry_out is not None:
                carry_out(instruction)

    def schedule(self) -> None:
        self.schedules += 1


# ---------------------------------------------------------------- the node state machine
# A NodeState over plain bookkeeping (idle lists, bundle pools, tables), with
# makers of tasks, workers and actors, for the unit tests that feed it events.
FUNCTION = b"\x0f" * 8
T0, W0 = 100.0, 1_700_000_000.0       # monotonic and wall "now" of the events


class MachineWorkers:
    """The worker pool's idle lists, as the state machine sees them."""

    def __init__(self):
        self.by_id, self.idle = {}, {}

    def pop_idle(self, key):
        workers = self.idle.get(key)
        return workers.pop() if workers else None

    def push_idle(self, worker):
        self.idle.setdefault(worker.env_key, []).append(worker)


class MachineBundles:
    """Bundle pools: (group hex, index) -> what is left of the bundle."""

    def __init__(self, **pools):
        self.left = {key: ResourceSet.from_dict(total) for key, total in pools.items()}
        self.gpus: dict = {}

    def try_acquire_bundle(self, task):
        left = self.left.get(task.bundle)
        if left is None or not task.hold.fits_in(left):
            return False
        self.left[task.bundle] = left - task.hold
        task.bundle_gpu_ids = self.gpus.get(task.bundle, [])
        return True

    def release_bundle(self, task):
        self.left[task.bundle] = self.left[task.bundle] + task.hold


class MachineNode:
    """A NodeState with its bookkeeping, and makers of tasks and workers."""

    def __init__(self, cpus: float = 2.0, gpu_ids=(), bundles=None, log=None, objects=None):
        self.tasks, self.actors, self.dead_peers = {}, {}, set()
        self.queue = TaskQueue(log)
        self.workers = MachineWorkers()
        self.resources = NodeResources(ResourceSet.from_dict(
            {"CPU": cpus, **({"GPU": float(len(gpu_ids))} if gpu_ids else {})}),
            instances={"GPU": list(gpu_ids)} if gpu_ids else None)
        self.state = NodeState(resources=self.resources, queue=self.queue, workers=self.workers,
                               bundles=bundles or MachineBundles(), log=log, gpu_ids=gpu_ids,
                               tasks=self.tasks, actors=self.actors,
                               peer_dead=self.dead_peers.__contains__, objects=objects)
        self.objects = self.state.objects
        self.owner = SimpleNamespace(conn_id=1, pid=4242)
        self._next = 0

    def handle(self, event):
        return self.state.handle(event)

    def task(self, *, cpus: float = 1.0, retries: int = 3, queued: bool = True,
             gpus: float = 0.0, bundle=None, name: str = "", args=(),
             returns=()) -> TaskRecord:
        self._next += 1
        resources = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
        spec = pb.TaskSpec(task_id=bytes([self._next]) * 4, name=name or f"t{self._next}",
                           function_id=FUNCTION, resources=resources, num_returns=1,
                           max_retries=retries, arg_ref_ids=list(args))
        task = TaskRecord.from_spec(spec, self.owner, "default", return_ids=list(returns))
        task.bundle = bundle
        self.tasks[spec.task_id] = task
        if queued:
            self.queue.push(task, "test: queued here")
        return task

    def actor(self, *, max_restarts: int = 0, name: str = "", detached: bool = False,
              queued: bool = True, owner=None) -> TaskRecord:
        """A new actor's creation task (its entry is ``task.actor``), holding 1 CPU."""
        self._next += 1
        options = {"max_restarts": max_restarts, "name": name, "class_name": "A",
                   **({"lifetime": "detached"} if detached else {})}
        spec = pb.TaskSpec(task_id=bytes([self._next]) * 4, name=f"A.__init__#{self._next}",
                           function_id=FUNCTION, resources={"CPU": 1.0}, num_returns=1,
                           actor_creation=True, actor_id=bytes([self._next]) * 16,
                           held_resources={"CPU": 1.0}, actor_options=json.dumps(options).encode())
        owner = owner or self.owner
        entry = ActorEntry.from_spec(spec, owner)
        self.actors[entry.actor_id] = entry
        task = TaskRecord.from_spec(spec, owner, "default", return_ids=[b"r" * 28], actor=entry)
        self.tasks[spec.task_id] = task
        if queued:
            self.queue.push(task, "test: queued here")
        return task

    def worker(self, pid: int, *, idle: bool = True) -> WorkerProcess:
        worker = WorkerProcess(worker_id=pid.to_bytes(4, "big"), env_key="default",
                               process=SimpleNamespace(pid=pid),
                               call_address=f"unix:/session/worker-{pid}.sock")
        self.workers.by_id[worker.worker_id] = worker
        if idle:
            self.workers.push_idle(worker)
        return worker

    def free_cpus(self) -> float:
        return self.resources.available.get("CPU", 0.0)

    def running(self, pid: int = 101, **options):
        """A worker running a fresh task: (task, worker)."""
        worker = self.worker(pid)
        task = self.task(**options)
        self.handle(m.Schedule(T0, W0))
        assert task.state is S.RUNNING and worker.current_task is task
        return task, worker
