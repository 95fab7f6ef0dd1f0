"""An actor method that exits the process -- sys.exit(), os._exit(), an
uncaught SystemExit, exit_actor() -- ends the actor promptly: the call that
exited, calls queued behind it and later calls fail with ActorDiedError
naming the cause, and the actor is restarted only where Ray restarts it
(max_restarts allows, and the exit was not intended). A KeyboardInterrupt
from a method's own code is, as in Ray, that call's TaskCancelledError."""
from __future__ import annotations

import asyncio
import os
import sys

import pytest

CALL_TIMEOUT_S = 30


def _leave(how: str):
    import meshray
    if how == "sys_exit":
        sys.exit(0)
    if how == "sys_exit_code":
        sys.exit(3)
    if how == "raise_system_exit":
        raise SystemExit("giving up")
    if how == "os_exit":
        os._exit(5)
    if how == "exit_actor":
        meshray.actor.exit_actor()
    if how == "keyboard_interrupt":
        raise KeyboardInterrupt
    raise AssertionError(how)


class _Sync:
    def pid(self):
        return os.getpid()

    def leave(self, how):
        _leave(how)


class _Async:
    async def pid(self):
        await asyncio.sleep(0)
        return os.getpid()

    async def leave(self, how):
        await asyncio.sleep(0)
        _leave(how)


def _actor(ray, kind: str, **options):
    if kind == "async":
        return ray.remote(**options)(_Async).remote()
    if kind == "threaded":
        return ray.remote(max_concurrency=4, **options)(_Sync).remote()
    return ray.remote(**options)(_Sync).remote()


CAUSES = {"sys_exit": "sys.exit", "sys_exit_code": "sys.exit", "raise_system_exit": "sys.exit",
          "os_exit": "worker process died", "exit_actor": "exit_actor"}


@pytest.mark.parametrize("kind", ["plain", "threaded", "async"])
@pytest.mark.parametrize("how", sorted(CAUSES))
def test_exit_fails_the_call_queued_and_later_calls_with_actor_died(ray, kind, how):
    actor = _actor(ray, kind)
    ray.get(actor.pid.remote(), timeout=CALL_TIMEOUT_S)
    exiting = actor.leave.remote(how)
    # Queued behind the exit on a plain actor (a concurrent one may run it first).
    queued = [actor.pid.remote()] if kind == "plain" else []
    with pytest.raises(ray.exceptions.ActorDiedError) as info:
        ray.get(exiting, timeout=CALL_TIMEOUT_S)
    if how != "os_exit":      # os._exit leaves no word: the node reports the death
        assert CAUSES[how] in str(info.value)
    for ref in [*queued, actor.pid.remote()]:
        with pytest.raises(ray.exceptions.ActorDiedError):
            ray.get(ref, timeout=CALL_TIMEOUT_S)
    with pytest.raises(ray.exceptions.ActorDiedError) as after:
        ray.get(actor.pid.remote(), timeout=CALL_TIMEOUT_S)
    assert CAUSES[how] in str(after.value)


@pytest.mark.parametrize("kind", ["plain", "threaded", "async"])
def test_keyboard_interrupt_in_a_method_is_that_calls_cancellation(ray, kind):
    actor = _actor(ray, kind)
    pid = ray.get(actor.pid.remote(), timeout=CALL_TIMEOUT_S)
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(actor.leave.remote("keyboard_interrupt"), timeout=CALL_TIMEOUT_S)
    assert ray.get(actor.pid.remote(), timeout=CALL_TIMEOUT_S) == pid   # still the same actor


@pytest.mark.parametrize("kind", ["plain", "threaded", "async"])
@pytest.mark.parametrize("how", ["sys_exit_code", "raise_system_exit", "os_exit"])
def test_unintended_exit_restarts_when_max_restarts_allows(ray, kind, how):
    actor = _actor(ray, kind, max_restarts=1)
    first = ray.get(actor.pid.remote(), timeout=CALL_TIMEOUT_S)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(actor.leave.remote(how), timeout=CALL_TIMEOUT_S)
    second = ray.get(actor.pid.remote(), timeout=60)
    assert second != first
    # The one restart is used up: the next exit is for good, with its cause.
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(actor.leave.remote(how), timeout=CALL_TIMEOUT_S)
    with pytest.raises(ray.exceptions.ActorDiedError) as info:
        ray.get(actor.pid.remote(), timeout=60)
    assert CAUSES[how] in str(info.value)


@pytest.mark.parametrize("kind", ["plain", "async"])
@pytest.mark.parametrize("how", ["exit_actor", "sys_exit"])
def test_intended_exit_is_never_restarted(ray, kind, how):
    actor = _actor(ray, kind, max_restarts=3)
    ray.get(actor.pid.remote(), timeout=CALL_TIMEOUT_S)
    with pytest.raises(ray.exceptions.ActorDiedError):
        ray.get(actor.leave.remote(how), timeout=CALL_TIMEOUT_S)
    with pytest.raises(ray.exceptions.ActorDiedError) as info:
        ray.get(actor.pid.remote(), timeout=CALL_TIMEOUT_S)
    assert CAUSES[how] in str(info.value)


def test_sys_exit_in_init_fails_creation(ray):
    @ray.remote
    class Quits:
        def __init__(self):
            sys.exit(2)

        def ping(self):
            return 1

    with pytest.raises(ray.exceptions.ActorDiedError):
        ray.get(Quits.remote().ping.remote(), timeout=CALL_TIMEOUT_S)
