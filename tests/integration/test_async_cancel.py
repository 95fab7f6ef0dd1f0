"""meshray.cancel on an actor call, as in Ray: a running call of an async
actor has its coroutine cancelled (it sees asyncio.CancelledError) and the
caller gets TaskCancelledError; a call that has not started never runs; a
running call of a plain actor is not interrupted; force=True is refused."""
from __future__ import annotations

import asyncio
import os
import time

import pytest

from tests.helpers import wait_for

CALL_TIMEOUT_S = 30


def _async_actor(ray, **options):
    @ray.remote(**options)
    class Sleeper:
        def __init__(self):
            self.events = []

        @ray.method(concurrency_group="naps")
        async def nap(self, tag):
            self.events.append(f"{tag} started")
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                self.events.append(f"{tag} saw CancelledError")
                raise
            self.events.append(f"{tag} finished")
            return tag

        async def log(self):
            return list(self.events)

    return Sleeper.remote()


def test_cancel_running_async_call_cancels_its_coroutine(ray):
    actor = _async_actor(ray, concurrency_groups={"naps": 10})
    ref = actor.nap.remote("a")
    wait_for(lambda: "a started" in ray.get(actor.log.remote()), timeout=CALL_TIMEOUT_S)
    ray.cancel(ref)
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(ref, timeout=CALL_TIMEOUT_S)
    assert ray.get(actor.log.remote(), timeout=CALL_TIMEOUT_S) == ["a started",
                                                                   "a saw CancelledError"]


def test_cancel_queued_async_call_never_runs_it(ray):
    actor = _async_actor(ray, concurrency_groups={"naps": 1})   # one nap at a time
    first = actor.nap.remote("first")
    second = actor.nap.remote("second")   # waits for the one slot
    wait_for(lambda: "first started" in ray.get(actor.log.remote()), timeout=CALL_TIMEOUT_S)
    ray.cancel(second)
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(second, timeout=CALL_TIMEOUT_S)
    ray.cancel(first)
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(first, timeout=CALL_TIMEOUT_S)
    assert "second started" not in ray.get(actor.log.remote(), timeout=CALL_TIMEOUT_S)


def test_cancel_on_plain_actor_skips_queued_call_and_lets_running_one_finish(ray, tmp_path):
    @ray.remote
    class Worker:
        def __init__(self):
            self.ran = []

        def work(self, tag, started=None, gate=None):
            self.ran.append(tag)
            if started is not None:
                open(started, "w").close()
                deadline = time.monotonic() + CALL_TIMEOUT_S
                while not os.path.exists(gate) and time.monotonic() < deadline:
                    time.sleep(0.01)
            return tag

        def ran_calls(self):
            return list(self.ran)

    started, gate = str(tmp_path / "started"), str(tmp_path / "gate")
    worker = Worker.remote()
    running = worker.work.remote("running", started, gate)
    queued = worker.work.remote("queued")
    wait_for(lambda: os.path.exists(started), timeout=CALL_TIMEOUT_S)
    ray.cancel(queued)
    ray.cancel(running)        # not interrupted: actors keep state
    # A queued call is answered as soon as its cancel reaches the actor,
    # while the running one still holds the actor.
    assert ray.wait([queued], timeout=CALL_TIMEOUT_S)[0] == [queued]
    open(gate, "w").close()
    assert ray.get(running, timeout=CALL_TIMEOUT_S) == "running"
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(queued, timeout=CALL_TIMEOUT_S)
    assert ray.get(worker.ran_calls.remote(), timeout=CALL_TIMEOUT_S) == ["running"]


def test_force_cancel_of_actor_call_is_refused(ray):
    actor = _async_actor(ray, concurrency_groups={"naps": 10})
    ref = actor.nap.remote("f")
    with pytest.raises(ValueError, match=r"force=True\) is not supported for actor tasks"):
        ray.cancel(ref, force=True)
    ray.cancel(ref)
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(ref, timeout=CALL_TIMEOUT_S)


@pytest.mark.parametrize("max_concurrency", [1, 4], ids=["plain", "threaded"])
def test_running_call_of_a_sync_actor_sees_is_canceled(ray, tmp_path, max_concurrency):
    """Ray's graceful cancel: the call is not interrupted, but is_canceled()
    turns True inside it, so the method can stop itself."""
    @ray.remote(max_concurrency=max_concurrency)
    class Poller:
        def poll(self, started):
            import meshray
            context = meshray.get_runtime_context()
            before = context.is_canceled()
            open(started, "w").close()
            deadline = time.monotonic() + CALL_TIMEOUT_S
            while not context.is_canceled() and time.monotonic() < deadline:
                time.sleep(0.01)
            return (before, context.is_canceled())

        def later(self):
            import meshray
            return meshray.get_runtime_context().is_canceled()

    started = str(tmp_path / "started")
    poller = Poller.remote()
    ref = poller.poll.remote(started)
    wait_for(lambda: os.path.exists(started), timeout=CALL_TIMEOUT_S)
    ray.cancel(ref)
    assert ray.get(ref, timeout=CALL_TIMEOUT_S) == (False, True)   # it ended itself
    # The flag belongs to that call only.
    assert ray.get(poller.later.remote(), timeout=CALL_TIMEOUT_S) is False


def test_is_canceled_is_a_runtime_error_in_an_async_actor_and_a_driver(ray):
    @ray.remote
    class Async:
        async def ask(self):
            import meshray
            try:
                meshray.get_runtime_context().is_canceled()
            except RuntimeError as error:
                return str(error)
            return "no error"

    assert "async actor" in ray.get(Async.remote().ask.remote(), timeout=CALL_TIMEOUT_S)
    with pytest.raises(RuntimeError, match="is_canceled"):
        ray.get_runtime_context().is_canceled()


def test_cancel_running_call_of_a_plain_async_actor(ray):
    """The same without concurrency groups: the actor's default group."""
    @ray.remote
    class Plain:
        def __init__(self):
            self.events = []

        async def nap(self):
            self.events.append("started")
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                self.events.append("saw CancelledError")
                raise
            return "finished"

        async def log(self):
            return list(self.events)

    actor = Plain.remote()
    ref = actor.nap.remote()
    wait_for(lambda: "started" in ray.get(actor.log.remote()), timeout=CALL_TIMEOUT_S)
    ray.cancel(ref)
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(ref, timeout=CALL_TIMEOUT_S)
    assert ray.get(actor.log.remote(), timeout=CALL_TIMEOUT_S) == ["started", "saw CancelledError"]
