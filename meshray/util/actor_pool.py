"""A fixed set of actors that work is spread over (`ray.util.ActorPool`).

The pool lives in the caller's process and only keeps books: which actor
is busy with which call, and which submissions wait for an actor to come
free. Each unit of work is ``fn(actor, value)``, which must start one
actor call and return its ObjectRef; the actor counts as busy until the
pool hands that result back (``get_next*``), so at most one call per actor
is in flight and slow actors are not queued behind.
"""
from __future__ import annotations

from typing import Any, Callable, List

from meshray._api import get, wait
from meshray.core.object_ref import ObjectRef

__all__ = ["ActorPool"]

_TIMEOUT_MESSAGE = "Timed out waiting for result"


class ActorPool:
    """Schedule calls over a fixed list of actor handles.

    ``map`` yields results in submission order, ``map_unordered`` as they
    finish. ``submit`` with ``get_next`` / ``get_next_unordered`` does the
    same one value at a time.
    """

    def __init__(self, actors: list):
        self._idle_actors = list(actors)
        self._future_to_actor: dict = {}      # ref -> (submission index, actor)
        self._index_to_future: dict = {}      # submission index -> ref
        self._next_task_index = 0
        self._next_return_index = 0
        self._pending_submits: list = []      # (fn, value) waiting for a free actor

    # ------------------------------------------------------------ bulk
    def map(self, fn: Callable[[Any, Any], ObjectRef], values: List[Any]):
        """Apply `fn` over `values` on the pool's actors; yield results in order.

        A generator: nothing is submitted before the first ``next()``.
        Results of earlier submissions still pending are discarded first, so
        what comes out belongs to this map alone.
        """
        self._discard_pending()
        for value in values:
            self.submit(fn, value)
        while self.has_next():
            yield self.get_next()

    def map_unordered(self, fn: Callable[[Any, Any], ObjectRef], values: List[Any]):
        """Like ``map``, but yield each result as soon as its call finishes."""
        self._discard_pending()
        for value in values:
            self.submit(fn, value)
        while self.has_next():
            yield self.get_next_unordered()

    def _discard_pending(self) -> None:
        # Every started call's actor goes back to the idle list, which
        # starts the waiting submissions (their results are dropped too).
        while self._future_to_actor:
            for future, (_, actor) in list(self._future_to_actor.items()):
                del self._future_to_actor[future]
                self._return_actor(actor)
        self._index_to_future.clear()
        self._next_return_index = self._next_task_index

    # ------------------------------------------------------------ one at a time
    def submit(self, fn: Callable[[Any, Any], ObjectRef], value: Any) -> None:
        """Run ``fn(actor, value)`` on an idle actor, or once one comes free."""
        if not self._idle_actors:
            self._pending_submits.append((fn, value))
            return
        actor = self._idle_actors.pop()
        future = fn(actor, value)
        if not isinstance(future, ObjectRef):
            self._idle_actors.append(actor)
            raise TypeError(f"ActorPool: fn(actor, value) must return the ObjectRef of one "
                            f"actor call (e.g. actor.method.remote(value)), got "
                            f"{type(future).__name__} for value {value!r}")
        index = self._next_task_index
        self._future_to_actor[future] = (index, actor)
        self._index_to_future[index] = future
        self._next_task_index += 1

    def has_next(self) -> bool:
        """True while some submitted result has not been returned yet."""
        return bool(self._future_to_actor)

    def get_next(self, timeout: float | None = None, ignore_if_timedout: bool = False):
        """The result of the oldest submission not yet returned, waiting for it.

        Raises StopIteration when nothing is pending, TimeoutError when
        `timeout` passes first. With ``ignore_if_timedout=True`` a timed-out
        call is dropped (its actor is free again) before the TimeoutError,
        so the next ``get_next`` moves on to the following submission.
        """
        if not self.has_next():
            raise StopIteration("No more results to get")
        index = self._next_return_index
        future = self._index_to_future.get(index)
        if future is None or index != min(self._index_to_future):
            # get_next_unordered() returned a later result: no order is left.
            raise ValueError("It is not allowed to call get_next() after get_next_unordered().")
        timed_out = False
        if timeout is not None:
            ready, _ = wait([future], timeout=timeout)
            if not ready:
                if not ignore_if_timedout:
                    raise TimeoutError(_TIMEOUT_MESSAGE)
                timed_out = True
        self._settle(future)
        if timed_out:
            raise TimeoutError(f"{_TIMEOUT_MESSAGE}. The task {future} has been ignored.")
        return get(future)

    def get_next_unordered(self, timeout: float | None = None,
                           ignore_if_timedout: bool = False):
        """The result of whichever pending call finishes first.

        Raises StopIteration when nothing is pending, TimeoutError when
        `timeout` passes first. With ``ignore_if_timedout=True`` the oldest
        pending call is dropped before the TimeoutError.
        """
        if not self.has_next():
            raise StopIteration("No more results to get")
        ready, _ = wait(list(self._future_to_actor), num_returns=1, timeout=timeout)
        if not ready:
            if ignore_if_timedout:
                oldest = self._index_to_future[min(self._index_to_future)]
                self._settle(oldest)
                raise TimeoutError(f"{_TIMEOUT_MESSAGE}. The task {oldest} has been ignored.")
            raise TimeoutError(_TIMEOUT_MESSAGE)
        future = ready[0]
        self._settle(future)
        return get(future)

    def _settle(self, future: ObjectRef) -> None:
        """Stop tracking `future` and give its actor back to the pool."""
        index, actor = self._future_to_actor.pop(future)
        del self._index_to_future[index]
        self._next_return_index = max(self._next_return_index, index + 1)
        self._return_actor(actor)

    def _return_actor(self, actor) -> None:
        self._idle_actors.append(actor)
        if self._pending_submits:
            self.submit(*self._pending_submits.pop(0))

    # ------------------------------------------------------------ membership
    def has_free(self) -> bool:
        """True when an actor is idle and no submission is waiting for one."""
        return bool(self._idle_actors) and not self._pending_submits

    def pop_idle(self):
        """Take an idle actor out of the pool (None when none is free)."""
        if self.has_free():
            return self._idle_actors.pop()
        return None

    def push(self, actor) -> None:
        """Add `actor` to the pool as idle (it picks up a waiting submission)."""
        busy = [entry[1] for entry in self._future_to_actor.values()]
        if actor in self._idle_actors or actor in busy:
            raise ValueError("Actor already belongs to current ActorPool")
        self._return_actor(actor)
