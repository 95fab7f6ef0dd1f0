"""`multiprocessing.Pool` on actors (`ray.util.multiprocessing.Pool`).

Each of the pool's "processes" is an actor that ran the initializer once.
Work is cut into chunks; each chunk is one actor call, dealt to the actors
in turn. A chunk's items run one by one in the actor; an item that raises
comes back as its exception (with the remote traceback as its cause, like
the standard library) instead of failing the call, so the other items of
the chunk still count and callbacks see the user's exception itself.

With ``maxtasksperchild`` an actor is retired after that many chunks: the
pool stops sending it work, drops its handle (an actor ends once the calls
already sent to it are done) and starts a fresh one in its place.
"""
from __future__ import annotations

import itertools
import logging
import threading
import traceback
from multiprocessing import TimeoutError
from multiprocessing.pool import RemoteTraceback
from typing import Any, Callable, Iterable, List, Optional

from meshray import _api
from meshray.core.object_ref import ObjectRef

__all__ = ["Pool", "AsyncResult", "IMapIterator", "TimeoutError"]

log = logging.getLogger(__name__)


class _Failure:
    """An item's exception, sent back as a value."""

    def __init__(self, error: BaseException, traceback_text: str):
        self.error = error
        self.traceback_text = traceback_text

    def reraise(self):
        error = self.error
        error.__cause__ = RemoteTraceback(self.traceback_text)
        raise error


class _PoolActor:
    def __init__(self, initializer: Optional[Callable], initargs: tuple):
        if initializer is not None:
            initializer(*initargs)

    def ping(self) -> bool:
        return True

    def run_batch(self, func: Callable, batch: list, star: bool) -> list:
        out = []
        for item in batch:
            try:
                out.append(func(*item) if star else func(item))
            except Exception as exc:  # noqa: BLE001 - the item's error is its result
                out.append(_Failure(exc, traceback.format_exc()))
        return out


def _first_failure(values: list) -> Optional[_Failure]:
    return next((v for v in values if isinstance(v, _Failure)), None)


class AsyncResult:
    """The pending result of ``apply_async``, ``map_async`` or ``starmap_async``."""

    def __init__(self, refs: List[ObjectRef], single: bool,
                 callback: Optional[Callable] = None,
                 error_callback: Optional[Callable] = None):
        self._refs = refs
        self._single = single
        self._values: Optional[list] = None     # flattened chunk results, once read
        self._error: Optional[BaseException] = None
        self._lock = threading.Lock()
        self._callback_thread = None
        if callback is not None or error_callback is not None:
            self._callback_thread = threading.Thread(
                target=self._run_callbacks, args=(callback, error_callback),
                name="meshray-pool-callback", daemon=True)
            self._callback_thread.start()

    def _run_callbacks(self, callback, error_callback) -> None:
        self.wait()
        try:
            value = self._collect()
        except Exception as exc:  # noqa: BLE001 - handed to error_callback
            if error_callback is not None:
                error_callback(exc)
            return
        if callback is not None:
            callback(value)

    def ready(self) -> bool:
        """True once every chunk has finished (successfully or not)."""
        if not self._refs:
            return True
        ready, _ = _api.wait(self._refs, num_returns=len(self._refs), timeout=0)
        return len(ready) == len(self._refs)

    def wait(self, timeout: Optional[float] = None) -> None:
        """Wait until the result is ready, or `timeout` seconds pass."""
        if self._refs:
            _api.wait(self._refs, num_returns=len(self._refs), timeout=timeout)

    def get(self, timeout: Optional[float] = None):
        """The result, once ready; re-raises an item's exception.

        Raises multiprocessing.TimeoutError when `timeout` passes first.
        """
        self.wait(timeout)
        if not self.ready():
            raise TimeoutError(f"the result was not ready within {timeout}s")
        thread = self._callback_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()   # as in the standard library: callbacks run before get() returns
        return self._collect()

    def successful(self) -> bool:
        """Whether the call finished without raising; ValueError if not ready yet."""
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        try:
            self._collect()
        except Exception:  # noqa: BLE001 - any error means "not successful"
            return False
        return True

    def _collect(self):
        with self._lock:
            if self._values is None and self._error is None:
                try:
                    chunks = _api.get(self._refs)
                except Exception as exc:  # noqa: BLE001 - a failed call: keep its error
                    self._error = exc
                else:
                    self._values = [v for chunk in chunks for v in chunk]
        if self._error is not None:
            raise self._error
        failure = _first_failure(self._values)
        if failure is not None:
            failure.reraise()
        return self._values[0] if self._single else list(self._values)


class IMapIterator:
    """What ``imap`` / ``imap_unordered`` return: results as an iterator.

    Every chunk is submitted when the iterator is made; iterating waits for
    the chunks in submission order, or (unordered) as each one finishes.
    """

    def __init__(self, refs: List[ObjectRef], ordered: bool):
        self._pending = list(refs)
        self._ordered = ordered
        self._buffer: list = []

    def __iter__(self):
        return self

    def __next__(self):
        return self.next()

    def next(self, timeout: Optional[float] = None):
        while not self._buffer:
            if not self._pending:
                raise StopIteration
            if self._ordered:
                ready, _ = _api.wait(self._pending[:1], timeout=timeout)
            else:
                ready, _ = _api.wait(self._pending, num_returns=1, timeout=timeout)
            if not ready:
                raise TimeoutError(f"no result was ready within {timeout}s")
            self._pending.remove(ready[0])
            self._buffer.extend(_api.get(ready[0]))
        value = self._buffer.pop(0)
        if isinstance(value, _Failure):
            value.reraise()
        return value


class Pool:
    """A pool of actor "processes" with the standard library's Pool methods.

    `processes` defaults to the cluster's CPU count and may not exceed it.
    `ray_remote_args` are the actors' options (by default they hold no CPU
    while idle, as any actor that names no resources). `context` is ignored.
    When this process is not connected yet, `ray_address` (or
    MESHRAY_ADDRESS / RAY_ADDRESS) is joined; with neither, a private
    cluster starts with `num_cpus=processes`.

    `apply`/`apply_async` take the keyword dict as `kwargs` (Ray's name) or
    `kwds` (the standard library's), not both.
    """

    def __init__(self, processes: Optional[int] = None, initializer: Optional[Callable] = None,
                 initargs: Optional[Iterable] = None, maxtasksperchild: Optional[int] = None,
                 context: Any = None, ray_address: Optional[str] = None,
                 ray_remote_args: Optional[dict] = None):
        if processes is not None and (isinstance(processes, bool)
                                      or not isinstance(processes, int) or processes < 1):
            raise ValueError(f"Number of processes must be at least 1, got processes={processes!r}")
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be a callable, got {initializer!r}")
        if maxtasksperchild is not None and (isinstance(maxtasksperchild, bool) or not isinstance(
                maxtasksperchild, int) or maxtasksperchild < 1):
            raise ValueError("maxtasksperchild must be a positive int or None, got "
                             f"{maxtasksperchild!r}")
        if ray_remote_args is not None and not isinstance(ray_remote_args, dict):
            raise TypeError(f"ray_remote_args={ray_remote_args!r} must be a dict or None")
        if context is not None:
            log.warning("Pool(context=...) is ignored: the pool's processes are actors")
        if not _api.is_initialized():
            if processes is not None and _api._resolve_address(ray_address) is None:
                _api.init(num_cpus=processes)     # a private cluster sized for the pool
            else:
                _api.init(address=ray_address)
        processes = _checked_processes(processes, int(_api.cluster_resources().get("CPU", 0)))
        self._initializer = initializer
        self._initargs = tuple(initargs or ())
        self._maxtasksperchild = maxtasksperchild
        actor_class = _api.remote(_PoolActor)
        self._actor_class = actor_class.options(**ray_remote_args) if ray_remote_args else actor_class
        self._actors = [[self._new_actor(), 0] for _ in range(processes)]
        self._turn = itertools.cycle(range(processes))
        self._submitted: List[ObjectRef] = []
        self._closed = False
        # Surface a failing initializer here, not at the first result.
        _api.get([actor.ping.remote() for actor, _ in self._actors])

    def _new_actor(self):
        return self._actor_class.remote(self._initializer, self._initargs)

    # ------------------------------------------------------------ submission
    def _check_running(self) -> None:
        if self._closed:
            raise ValueError("Pool not running")

    def _submit_chunks(self, func: Callable, iterable: Iterable, chunksize: Optional[int],
                       star: bool) -> List[ObjectRef]:
        self._check_running()
        if not callable(func):
            raise TypeError(f"func={func!r} is not callable")
        items = list(iterable)
        if chunksize is None:
            # The standard library's default: about four chunks per process.
            chunksize, extra = divmod(len(items), len(self._actors) * 4)
            chunksize += 1 if extra or not chunksize else 0
        elif isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize!r}")
        refs = [self._run_batch(func, items[start:start + chunksize], star)
                for start in range(0, len(items), chunksize)]
        self._submitted.extend(refs)
        return refs

    def _run_batch(self, func: Callable, batch: list, star: bool) -> ObjectRef:
        slot = self._actors[next(self._turn)]
        ref = slot[0].run_batch.remote(func, batch, star)
        slot[1] += 1
        if self._maxtasksperchild is not None and slot[1] >= self._maxtasksperchild:
            # Dropping the handle retires the actor after the calls it has.
            slot[0], slot[1] = self._new_actor(), 0
        return ref

    # ------------------------------------------------------------ the API
    def apply(self, func: Callable, args: Optional[tuple] = None, kwargs: Optional[dict] = None,
              *, kwds: Optional[dict] = None):
        """``func(*args, **kwargs)`` in one of the pool's processes; waits for it."""
        return self.apply_async(func, args, _keyword_dict("apply", kwargs, kwds)).get()

    def apply_async(self, func: Callable, args: Optional[tuple] = None,
                    kwargs: Optional[dict] = None, callback: Optional[Callable] = None,
                    error_callback: Optional[Callable] = None, *,
                    kwds: Optional[dict] = None) -> AsyncResult:
        """Start ``func(*args, **kwargs)``; its AsyncResult re-raises its error on get()."""
        kwargs = _keyword_dict("apply_async", kwargs, kwds)
        self._check_running()
        if not callable(func):
            raise TypeError(f"func={func!r} is not callable")
        bound_args, bound_kwds = tuple(args or ()), dict(kwargs or {})
        ref = self._run_batch(_call_with_kwargs, [(func, bound_args, bound_kwds)], True)
        self._submitted.append(ref)
        return AsyncResult([ref], True, callback, error_callback)

    def map(self, func: Callable, iterable: Iterable, chunksize: Optional[int] = None) -> list:
        """``[func(x) for x in iterable]``, computed in the pool, in order."""
        return self.map_async(func, iterable, chunksize).get()

    def map_async(self, func: Callable, iterable: Iterable, chunksize: Optional[int] = None,
                  callback: Optional[Callable] = None,
                  error_callback: Optional[Callable] = None) -> AsyncResult:
        return AsyncResult(self._submit_chunks(func, iterable, chunksize, False), False,
                           callback, error_callback)

    def starmap(self, func: Callable, iterable: Iterable,
                chunksize: Optional[int] = None) -> list:
        """``[func(*args) for args in iterable]``, computed in the pool, in order."""
        return self.starmap_async(func, iterable, chunksize).get()

    def starmap_async(self, func: Callable, iterable: Iterable,
                      chunksize: Optional[int] = None, callback: Optional[Callable] = None,
                      error_callback: Optional[Callable] = None) -> AsyncResult:
        return AsyncResult(self._submit_chunks(func, iterable, chunksize, True), False,
                           callback, error_callback)

    def imap(self, func: Callable, iterable: Iterable, chunksize: int = 1) -> IMapIterator:
        """An iterator over ``func(x)`` for each item, in order."""
        return IMapIterator(self._submit_chunks(func, iterable, chunksize, False), ordered=True)

    def imap_unordered(self, func: Callable, iterable: Iterable,
                       chunksize: int = 1) -> IMapIterator:
        """An iterator over ``func(x)`` for each item, as each chunk finishes."""
        return IMapIterator(self._submit_chunks(func, iterable, chunksize, False),
                            ordered=False)

    # ------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Accept no more work; what was submitted still runs."""
        self._closed = True

    def terminate(self) -> None:
        """Stop every process now; pending results fail."""
        self._closed = True
        actors, self._actors = self._actors, []
        for actor, _ in actors:
            _api.kill(actor)
        self._submitted = []

    def join(self) -> None:
        """Wait for all submitted work to finish (after close() or terminate())."""
        if not self._closed:
            raise ValueError("Pool is still running")
        if self._submitted:
            _api.wait(self._submitted, num_returns=len(self._submitted))
        self._submitted = []
        self._actors = []       # their handles go: each actor ends once idle

    def __enter__(self):
        self._check_running()
        return self

    def __exit__(self, *exc_info):
        self.terminate()


def _call_with_kwargs(func: Callable, args: tuple, kwds: dict):
    return func(*args, **kwds)


def _checked_processes(processes: Optional[int], cluster_cpus: int) -> int:
    """How many actors the pool starts: `processes`, else one per CPU of the cluster.

    As Ray, a pool never has more processes than the cluster has CPUs."""
    if processes is None:
        processes = max(1, cluster_cpus)
    if processes > cluster_cpus:
        raise ValueError(f"Pool(processes={processes}) asks for {processes} processes, but "
                         f"the cluster has only {cluster_cpus} CPUs (expected at most one "
                         f"process per CPU)")
    return processes


def _keyword_dict(method: str, kwargs: Optional[dict], kwds: Optional[dict]) -> Optional[dict]:
    """The one keyword dict given, under Ray's name (`kwargs`) or the standard library's."""
    if kwargs is not None and kwds is not None:
        raise TypeError(f"{method}() got the keyword arguments twice, as kwargs={kwargs!r} and "
                        f"kwds={kwds!r}; pass one of them (kwargs is Ray's name, kwds the "
                        f"standard library's)")
    return kwds if kwargs is None else kwargs
