"""Large actor-call arguments: images mapped zero-copy, files in the node's shared memory.

See meshray/core/arg_files.py: a same-node call whose arguments pickle to
more than 100 KiB carries the name of a file the caller wrote in the store's
args/ directory; the actor maps it read-only.
"""
from __future__ import annotations

import hashlib
import os
import signal
import sys

import cloudpickle
import numpy as np
import pytest

from meshray.common import arg_dir
from meshray.core import arg_files
from tests.helpers import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])

MIB = 1024 * 1024


pytestmark = pytest.mark.meshray_init(num_cpus=2)


def _core():
    from meshray.core.state import state
    return state.core


def _files(prefix: str = "") -> list:
    try:
        names = os.listdir(arg_dir.args_dir(_core().store_dir))
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def _pooled() -> set:
    core = _core()
    writer = arg_files._writer(core.store_dir, core.worker_id, create=False)
    if writer is None:
        return set()
    with writer.lock:
        return {name for names in writer.free.values() for name, _ in names}


def _digest(value) -> str:
    if isinstance(value, np.ndarray):
        value = np.ascontiguousarray(value).tobytes()
    return hashlib.sha256(value).hexdigest()


@pytest.fixture(scope="module")
def inspector(ray):
    @ray.remote(num_cpus=0)
    class Inspector:
        def describe(self, value, *, extra=None, nested=None):
            out = {"type": type(value).__name__, "digest": _digest(value)}
            if isinstance(value, np.ndarray):
                out.update(writeable=value.flags.writeable, dtype=str(value.dtype),
                           shape=value.shape, fortran=value.flags.f_contiguous)
            if extra is not None:
                out["extra"] = (_digest(extra), extra.flags.writeable)
            if nested is not None:
                out["nested"] = {k: _digest(v) for k, v in nested.items()}
            return out

        def keep(self, value):
            self.kept = value
            return int(value[0])

        def kept_value(self):
            return int(self.kept[0]), _digest(self.kept)

        def echo(self, value):
            return value

        def pid(self):
            return os.getpid()

    actor = Inspector.remote()
    ray.get(actor.pid.remote())
    return actor


def test_large_numpy_arg_arrives_intact_and_read_only(ray, inspector):
    rng = np.random.default_rng(0)
    ray.get(inspector.describe.remote(np.zeros(200_000)))  # the connection locates the actor
    for array in (rng.integers(0, 255, MIB, dtype=np.uint8),
                  rng.standard_normal((300, 500)),
                  np.asfortranarray(rng.standard_normal((400, 300)))):
        out = ray.get(inspector.describe.remote(array))
        assert out["digest"] == _digest(array)
        assert out["writeable"] is False             # as in Ray: a view of shared memory
        assert out["dtype"] == str(array.dtype) and out["shape"] == array.shape
        assert out["fortran"] == array.flags.f_contiguous
    big = rng.integers(0, 255, 2 * MIB, dtype=np.uint8)
    out = ray.get(inspector.describe.remote(np.arange(10), extra=big,
                                            nested={"a": big[:MIB], "b": big[MIB:]}))
    assert out["extra"] == (_digest(big), False)
    assert out["nested"] == {"a": _digest(big[:MIB]), "b": _digest(big[MIB:])}
    # The caller's array is its own, still writable.
    assert big.flags.writeable


def test_large_bytes_and_bytearray_args(ray, inspector):
    payload = os.urandom(3 * MIB)
    out = ray.get(inspector.describe.remote(payload))
    assert out == {"type": "bytes", "digest": _digest(payload)}
    out = ray.get(inspector.describe.remote(bytearray(payload)))
    assert out == {"type": "bytearray", "digest": _digest(payload)}


def test_argument_values_and_call_order_under_pipelining(ray):
    @ray.remote(num_cpus=0)
    class Log:
        def __init__(self):
            self.seen = []

        def add(self, i, array):
            self.seen.append((i, int(array[0]), int(array[-1]), array.nbytes))
            return i

        def history(self):
            return self.seen

    log = Log.remote()
    refs = [log.add.remote(i, np.full(MIB // 8 + i, i, dtype=np.int64)) for i in range(60)]
    assert ray.get(refs) == list(range(60))
    assert ray.get(log.history.remote()) == [(i, i, i, (MIB // 8 + i) * 8) for i in range(60)]


def test_no_arg_files_left_behind(ray, inspector):
    array = np.ones(MIB, dtype=np.uint8)
    ray.get([inspector.describe.remote(array) for _ in range(40)])
    # Every file of a finished call is gone or pooled for reuse by this process.
    assert set(_files()) == _pooled()
    assert sum(os.path.getsize(os.path.join(arg_dir.args_dir(_core().store_dir), n))
               for n in _files()) <= arg_files.POOL_BYTES
    # An argument the actor keeps: its file is removed (never overwritten)
    # and the actor's copy stays intact while this process writes new files.
    kept = np.full(MIB, 7, dtype=np.uint8)
    assert ray.get(inspector.keep.remote(kept)) == 7
    ray.get([inspector.describe.remote(np.full(MIB, 9, dtype=np.uint8)) for _ in range(10)])
    assert ray.get(inspector.kept_value.remote()) == (7, _digest(kept))
    # An argument returned as the result is not reused either.
    echoed = ray.get(inspector.echo.remote(np.full(MIB, 5, dtype=np.uint8)))
    ray.get([inspector.describe.remote(np.full(MIB, 6, dtype=np.uint8)) for _ in range(10)])
    assert echoed.min() == echoed.max() == 5
    assert set(_files()) == _pooled()
    core = _core()
    arg_files.drop_pool(core.store_dir, core.worker_id)
    assert _files() == []


def test_async_and_threaded_actors_get_large_args(ray):
    @ray.remote(num_cpus=0)
    class Async:
        async def total(self, array):
            return int(array.sum()), array.flags.writeable

    @ray.remote(num_cpus=0, max_concurrency=4)
    class Threaded:
        def total(self, array):
            return int(array.sum()), array.flags.writeable

    for cls in (Async, Threaded):
        actor = cls.remote()
        arrays = [np.full(MIB // 8, i, dtype=np.int64) for i in range(20)]
        assert ray.get([actor.total.remote(a) for a in arrays]) == [
            (int(a.sum()), False) for a in arrays]
    assert set(_files()) == _pooled()


def test_call_retried_after_actor_restart_keeps_its_large_arg(ray, tmp_path):
    marker = tmp_path / "started"

    @ray.remote(num_cpus=0, max_restarts=1, max_task_retries=-1)
    class Phoenix:
        def pid(self):
            return os.getpid()

        def digest(self, path, array):
            if not os.path.exists(path):
                open(path, "w").close()
                import time
                time.sleep(60)      # killed here on the first attempt
            return _digest(array), array.flags.writeable

    phoenix = Phoenix.remote()
    pid = ray.get(phoenix.pid.remote())
    array = np.random.default_rng(1).integers(0, 255, 2 * MIB, dtype=np.uint8)
    ref = phoenix.digest.remote(str(marker), array)
    wait_for(marker.exists, timeout=30, message="first attempt started")
    os.kill(pid, signal.SIGKILL)
    assert ray.get(ref, timeout=60) == (_digest(array), False)
    assert ray.get(phoenix.pid.remote(), timeout=60) != pid
    assert set(_files()) == _pooled()


def test_calls_to_a_dead_actor_fail_and_release_their_files(ray, inspector):
    @ray.remote(num_cpus=0)
    class Mortal:
        def pid(self):
            return os.getpid()

        def block(self, array):
            import time
            time.sleep(60)

    mortal = Mortal.remote()
    pid = ray.get(mortal.pid.remote())
    refs = [mortal.block.remote(np.ones(MIB, dtype=np.uint8)) for _ in range(5)]
    wait_for(lambda: len(set(_files()) - _pooled()) >= 5, message="argument files written")
    os.kill(pid, signal.SIGKILL)
    for ref in refs:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(ref, timeout=60)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(mortal.block.remote(np.ones(MIB, dtype=np.uint8)), timeout=60)
    assert set(_files()) == _pooled()


def test_sigkilled_caller_leaves_no_arg_files(ray, tmp_path):
    gate = tmp_path / "open"

    @ray.remote(num_cpus=0)
    class Target:
        def wait(self, path, array):
            import time
            while not os.path.exists(path):
                time.sleep(0.05)
            return int(array[0])

    @ray.remote(num_cpus=0)
    class Caller:
        def fire(self, target, path, n):
            import meshray
            open(path, "w").close()
            meshray.get(target.wait.remote(path, np.zeros(MIB, dtype=np.uint8)))
            os.unlink(path)
            self.refs = [target.wait.remote(path, np.full(MIB, i, dtype=np.uint8))
                         for i in range(n)]
            return os.getpid()

    target = Target.remote()
    caller = Caller.remote()
    caller_pid = ray.get(caller.fire.remote(target, str(gate), 8), timeout=60)
    prefix = f"{caller_pid}-"
    wait_for(lambda: len(_files(prefix)) >= 8, message="the caller's files exist")
    os.kill(caller_pid, signal.SIGKILL)
    # The node sweeps the files of a core worker whose connection closed.
    wait_for(lambda: not _files(prefix), timeout=30, message="the node swept the files")
    gate.touch()          # calls the actor had already received still run
    assert ray.get(target.wait.remote(str(gate), np.ones(MIB, dtype=np.uint8)),
                   timeout=60) == 1
