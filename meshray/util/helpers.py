"""Results as they finish (`ray.util.as_completed`, `ray.util.map_unordered`).

Both wait in batches of `chunk_size` refs (``wait(num_returns=...)``): a
batch comes out as soon as that many are ready, so results flow while the
rest still run, without one ``get`` per ref. Extra keyword arguments go to
``wait()`` (``timeout=`` bounds each batch's wait: when it passes, the refs
ready by then come out and the next batch starts). Arguments are checked
when the function is called, not at the first ``next()``.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional, Sequence

from meshray._api import get, wait

__all__ = ["as_completed", "map_unordered"]

DEFAULT_CHUNK_SIZE = 10
DEFAULT_BACKPRESSURE_SIZE = 100


def _check_positive(function: str, name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        expected = "an int >= 1" + (" or None" if allow_none else "")
        raise ValueError(f"{function}() argument `{name}`={value!r} must be {expected}")


def _next_batch(refs: list, chunk_size: int, yield_obj_refs: bool, wait_kwargs: dict):
    """(what to yield, refs still pending) after one ``wait``."""
    ready, pending = wait(refs, num_returns=min(chunk_size, len(refs)), **wait_kwargs)
    return (ready if yield_obj_refs else get(ready)), pending


def as_completed(refs: Sequence, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 yield_obj_refs: bool = False, **kwargs) -> Iterator[Any]:
    """Yield the values of `refs` (or the refs, with `yield_obj_refs`) as they finish.

    Within a batch the order is the order of `refs`; across batches it is
    completion order. A task's error is raised when its batch comes out.
    """
    _check_positive("as_completed", "chunk_size", chunk_size)
    pending = list(refs)

    def results():
        nonlocal pending
        while pending:
            batch, pending = _next_batch(pending, chunk_size, yield_obj_refs, kwargs)
            yield from batch

    return results()


def map_unordered(fn, items: Iterable[Any], *,
                  backpressure_size: Optional[int] = DEFAULT_BACKPRESSURE_SIZE,
                  chunk_size: int = DEFAULT_CHUNK_SIZE, yield_obj_refs: bool = False,
                  **kwargs) -> Iterator[Any]:
    """``fn.remote(item)`` for each item; yield results as they finish.

    At most `backpressure_size` tasks are in flight (None: no limit): once
    that many are submitted, a batch of results is waited for and yielded
    before more items are submitted. `items` is read lazily.
    """
    if not callable(getattr(fn, "remote", None)):
        raise TypeError(f"map_unordered() argument fn={fn!r} must be a remote function "
                        "(decorated with @meshray.remote)")
    _check_positive("map_unordered", "backpressure_size", backpressure_size, allow_none=True)
    _check_positive("map_unordered", "chunk_size", chunk_size)

    def results():
        in_flight: list = []
        for item in items:
            if backpressure_size is not None and len(in_flight) >= backpressure_size:
                batch, in_flight = _next_batch(in_flight, chunk_size, yield_obj_refs, kwargs)
                yield from batch
            in_flight.append(fn.remote(item))
        while in_flight:
            batch, in_flight = _next_batch(in_flight, chunk_size, yield_obj_refs, kwargs)
            yield from batch

    return results()
