"""A first-in first-out queue shared by the driver, tasks and actors
(`ray.util.queue.Queue`).

The items live in one async actor; a ``Queue`` object is a thin client
holding the actor's handle, so it pickles into tasks and actors and every
copy talks to the same items. A blocking ``get``/``put`` waits inside the
actor as an awaiting coroutine, which does not hold the actor: other
callers' puts and gets run meanwhile (up to the async actor's concurrency,
1000 by default). The actor answers "done" or "would block" rather than
raising, so ``Empty``/``Full`` reach the caller as themselves, not wrapped
in a task error.
"""
from __future__ import annotations

import asyncio
import queue as std_queue
from collections.abc import Iterable
from typing import Any, List, Optional

from meshray._api import get, kill, remote, wait

__all__ = ["Queue", "Empty", "Full"]


class Empty(std_queue.Empty):
    """``get`` found no item (non-blocking, or within its timeout)."""


class Full(std_queue.Full):
    """``put`` found no room (non-blocking, or within its timeout)."""


class _QueueActor:
    """Holds the items. Every method answers without raising for the
    would-block cases: (ok, value) or ok."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self.queue: asyncio.Queue = asyncio.Queue(maxsize)

    async def qsize(self) -> int:
        return self.queue.qsize()

    async def empty(self) -> bool:
        return self.queue.empty()

    async def full(self) -> bool:
        return self.queue.full()

    async def put(self, item, timeout: Optional[float] = None) -> bool:
        if timeout is not None and timeout <= 0:
            return await self.put_nowait(item)
        try:
            await asyncio.wait_for(self.queue.put(item), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def put_nowait(self, item) -> bool:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            return False
        return True

    async def put_nowait_batch(self, items: list) -> bool:
        if self.maxsize > 0 and len(items) + self.queue.qsize() > self.maxsize:
            return False
        for item in items:
            self.queue.put_nowait(item)
        return True

    async def get(self, timeout: Optional[float] = None):
        if timeout is not None and timeout <= 0:
            return await self.get_nowait()
        try:
            return True, await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return False, None

    async def get_nowait(self):
        try:
            return True, self.queue.get_nowait()
        except asyncio.QueueEmpty:
            return False, None

    async def get_nowait_batch(self, num_items: int):
        if num_items > self.queue.qsize():
            return False, self.queue.qsize()
        return True, [self.queue.get_nowait() for _ in range(num_items)]


def _check_timeout(timeout) -> Optional[float]:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"Queue: timeout={timeout!r} must be a number of seconds or None")
    if timeout < 0:
        raise ValueError(f"'timeout' must be a non-negative number, got {timeout!r}")
    return float(timeout)


class Queue:
    """A queue of up to `maxsize` items (0: unbounded), backed by an actor.

    `actor_options` are passed to the actor's ``.options()`` (for example
    ``{"name": ..., "lifetime": "detached", "num_cpus": 0}``).
    """

    def __init__(self, maxsize: int = 0, actor_options: Optional[dict] = None):
        if isinstance(maxsize, bool) or not isinstance(maxsize, int):
            raise TypeError(f"Queue: maxsize={maxsize!r} must be an int (0 or less: unbounded)")
        if actor_options is not None and not isinstance(actor_options, dict):
            raise TypeError(f"Queue: actor_options={actor_options!r} must be a dict or None")
        self.maxsize = maxsize
        actor_class = remote(_QueueActor)
        if actor_options:
            actor_class = actor_class.options(**actor_options)
        self.actor = actor_class.remote(maxsize)

    def __len__(self) -> int:
        return self.size()

    def size(self) -> int:
        """The number of items in the queue now."""
        return self.qsize()

    def qsize(self) -> int:
        """The number of items in the queue now."""
        return get(self._live().qsize.remote())

    def empty(self) -> bool:
        return get(self._live().empty.remote())

    def full(self) -> bool:
        return get(self._live().full.remote())

    def put(self, item: Any, block: bool = True, timeout: Optional[float] = None) -> None:
        """Add `item`; with `block`, wait (up to `timeout` seconds) for room.

        Raises Full when there is no room in time (at once when not blocking).
        """
        timeout = _check_timeout(timeout)
        actor = self._live()
        if block:
            done = get(actor.put.remote(item, timeout))
        else:
            done = get(actor.put_nowait.remote(item))
        if not done:
            raise Full(f"the queue is full (maxsize {self.maxsize})")

    async def put_async(self, item: Any, block: bool = True,
                        timeout: Optional[float] = None) -> None:
        """``put`` for asyncio code: awaits the actor instead of blocking a thread."""
        timeout = _check_timeout(timeout)
        actor = self._live()
        ref = actor.put.remote(item, timeout) if block else actor.put_nowait.remote(item)
        if not await ref:
            raise Full(f"the queue is full (maxsize {self.maxsize})")

    def get(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        """Remove and return the oldest item; with `block`, wait (up to
        `timeout` seconds) for one. Raises Empty when none comes in time."""
        timeout = _check_timeout(timeout)
        actor = self._live()
        if block:
            found, item = get(actor.get.remote(timeout))
        else:
            found, item = get(actor.get_nowait.remote())
        if not found:
            raise Empty("the queue is empty")
        return item

    async def get_async(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        """``get`` for asyncio code."""
        timeout = _check_timeout(timeout)
        actor = self._live()
        ref = actor.get.remote(timeout) if block else actor.get_nowait.remote()
        found, item = await ref
        if not found:
            raise Empty("the queue is empty")
        return item

    def put_nowait(self, item: Any) -> None:
        """``put(item, block=False)``."""
        self.put(item, block=False)

    def put_nowait_batch(self, items: Iterable) -> None:
        """Add all of `items` at once, or none of them (Full when they do not fit)."""
        if not isinstance(items, Iterable):
            raise TypeError(f"Argument 'items' must be an Iterable, got {type(items).__name__}")
        items = list(items)
        if not get(self._live().put_nowait_batch.remote(items)):
            raise Full(f"Cannot add {len(items)} items to queue of size {self.qsize()} "
                       f"and maxsize {self.maxsize}.")

    def get_nowait(self) -> Any:
        """``get(block=False)``."""
        return self.get(block=False)

    def get_nowait_batch(self, num_items: int) -> List[Any]:
        """Remove and return the `num_items` oldest items, or none (Empty when
        fewer are queued)."""
        if isinstance(num_items, bool) or not isinstance(num_items, int):
            raise TypeError(f"Argument 'num_items' must be an int, got {num_items!r}")
        if num_items < 0:
            raise ValueError(f"'num_items' must be nonnegative, got {num_items}")
        found, items = get(self._live().get_nowait_batch.remote(num_items))
        if not found:
            raise Empty(f"Cannot get {num_items} items from queue of size {items}.")
        return items

    def shutdown(self, force: bool = False, grace_period_s: int = 5) -> None:
        """End the queue's actor; the queue (and every copy of it) is unusable after.

        Without `force` the actor first finishes calls already sent to it,
        for up to `grace_period_s` seconds, then is killed.
        """
        actor, self.actor = self.actor, None
        if actor is None:
            return
        if force:
            kill(actor, no_restart=True)
            return
        done, _ = wait([actor.__ray_terminate__.remote()], timeout=grace_period_s)
        if not done:
            kill(actor, no_restart=True)

    def _live(self):
        if self.actor is None:
            raise RuntimeError("this Queue was shut down")
        return self.actor
