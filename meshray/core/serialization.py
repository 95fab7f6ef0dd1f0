"""How values become bytes and back.

Values are pickled with protocol 5 through cloudpickle. Large values keep
their buffers (numpy arrays, bytes-likes) out of band so the object store can
lay them out in shared memory and readers can map them without a copy. While
a value is pickled, every ObjectRef inside it is recorded: the node must keep
those objects alive for as long as the containing object lives.

Custom serializers (``register_reducer``) are per process, as in Ray: they
change how this process pickles instances of a class. The deserializer
travels inside the pickle, so a reader needs no registration of its own.
"""
from __future__ import annotations

import io
import pickle
import threading
import traceback
from collections import ChainMap
from dataclasses import dataclass, field

import cloudpickle

from meshray import exceptions

__all__ = [
    "INLINE_THRESHOLD",
    "SerializedValue",
    "serialize",
    "deserialize_inline",
    "deserialize_buffers",
    "record_contained_ref",
    "serialize_error",
    "register_reducer",
    "unregister_reducer",
    "dumps",
]

# Values at or below this many bytes travel inline with messages; larger ones
# go to the shared-memory store (docs/architecture.md, "Objects and ownership").
INLINE_THRESHOLD = 100 * 1024

_context = threading.local()
_PLAIN_TYPES = frozenset({int, float, str, bytes, bool, type(None), complex})
# class -> reducer(obj) -> (rebuild, args). Read through the pickler's
# dispatch table, so a registration applies to every later serialize().
_custom_reducers: dict = {}


class _CustomPickler(cloudpickle.CloudPickler):
    # The C pickler reads dispatch_table once, at construction: it has to be
    # a class attribute, and a live view of the registry.
    dispatch_table = ChainMap(_custom_reducers, cloudpickle.CloudPickler.dispatch_table)


def _rebuild_custom(deserializer, serialized):
    return deserializer(serialized)


def register_reducer(cls: type, serializer, deserializer) -> None:
    """Pickle instances of `cls` in this process as ``deserializer(serializer(obj))``.

    Only this process's pickling changes; a worker that returns such values
    registers the class itself.
    """
    if not isinstance(cls, type):
        raise TypeError(f"register_serializer() argument cls={cls!r} must be a class")
    if cls in _PLAIN_TYPES:
        raise ValueError(f"register_serializer() argument cls={cls.__name__} is a built-in "
                         "type pickle writes directly; it cannot have a custom serializer")
    for label, function in (("serializer", serializer), ("deserializer", deserializer)):
        if not callable(function):
            raise TypeError(f"register_serializer() argument {label}={function!r} "
                            "must be callable")

    def reduce(obj):
        return _rebuild_custom, (deserializer, serializer(obj))

    _custom_reducers[cls] = reduce


def unregister_reducer(cls: type) -> None:
    """Forget `cls`'s custom serializer; nothing happens when it has none."""
    _custom_reducers.pop(cls, None)


def dumps(value, **kwargs) -> bytes:
    """cloudpickle at protocol 5, with this process's custom serializers."""
    if not _custom_reducers:
        return cloudpickle.dumps(value, protocol=5, **kwargs)
    out = io.BytesIO()
    _CustomPickler(out, protocol=5, **kwargs).dump(value)
    return out.getvalue()


@dataclass
class SerializedValue:
    inband: bytes
    buffers: list = field(default_factory=list)   # pickle.PickleBuffer
    contained_ids: list = field(default_factory=list)
    inline_limit: int = INLINE_THRESHOLD

    @property
    def total_bytes(self) -> int:
        return len(self.inband) + sum(memoryview(b).nbytes for b in self.buffers)

    @property
    def is_inline(self) -> bool:
        return not self.buffers and len(self.inband) <= self.inline_limit


def record_contained_ref(object_id: bytes) -> None:
    """Called by ObjectRef.__reduce__: note a ref nested in the value being pickled."""
    ids = getattr(_context, "ids", None)
    if ids is not None:
        ids.append(object_id)


def serialize(value, *, what: str = "value", inline_limit: int = INLINE_THRESHOLD) -> SerializedValue:
    """Pickle `value`, keeping buffers out of band only when they are worth it.

    `what` names the value in errors ("argument 2 of f", "return value of g")
    so an unpicklable argument says which one failed and why. Values up to
    `inline_limit` bytes come back as one in-band blob (callers that send
    straight to a peer, like actor calls, allow more than the store default).
    """
    if type(value) in _PLAIN_TYPES:
        # Plain values need neither cloudpickle nor ref tracking.
        inband = pickle.dumps(value, protocol=5)
        if len(inband) <= inline_limit:
            return SerializedValue(inband, inline_limit=inline_limit)
    previous = getattr(_context, "ids", None)
    _context.ids = ids = []
    buffers: list = []
    try:
        try:
            inband = dumps(value, buffer_callback=buffers.append)
        except Exception as exc:  # noqa: BLE001 - any pickling failure is the user's TypeError
            raise TypeError(
                f"could not serialize {what} of type {type(value).__name__}: {exc}") from exc
        if buffers and len(inband) + sum(memoryview(b).nbytes for b in buffers) <= inline_limit:
            # Small: one in-band blob is cheaper to ship than separate buffers.
            ids.clear()
            inband = dumps(value)
            buffers = []
    finally:
        _context.ids = previous
    return SerializedValue(inband, buffers, list(dict.fromkeys(ids)), inline_limit)


def deserialize_inline(data: bytes):
    return pickle.loads(data)


def deserialize_buffers(inband, buffers):
    """Unpickle against out-of-band buffers (zero-copy when they are mapped)."""
    return pickle.loads(inband, buffers=buffers)


def serialize_error(error: BaseException) -> bytes:
    """The wire form of a task's error; never raises.

    By value (cloudpickle): an exception class defined in the driver's
    `__main__` (or inside a function) exists in a worker only as the copy
    cloudpickle rebuilt, so plain pickle, which looks classes up by name,
    cannot pickle it there. The blob is loaded once on this side too, so an
    error the receiver could not rebuild (a `__reduce__` or `__setstate__`
    that raises) is caught here instead of failing the caller's `get`. Such
    an error is replaced by a RayTaskError that keeps its type name, text
    and traceback.
    """
    try:
        blob = cloudpickle.dumps(error, protocol=5)
        pickle.loads(blob)
        return blob
    except Exception as exc:  # noqa: BLE001 - any failure: send a stand-in instead
        return cloudpickle.dumps(_error_stand_in(error, exc), protocol=5)


def _text_of(error: BaseException) -> str:
    try:
        return str(error)
    except Exception:  # noqa: BLE001 - a broken __str__ must not hide the error
        return "<str() failed>"


def _error_stand_in(error: BaseException, problem: BaseException) -> exceptions.RayError:
    """A picklable error that says what `error` was and why it could not travel.

    Ray's UnserializableException carries the text: as the cause inside the
    task error (whose traceback is kept), or alone for any other error."""
    if isinstance(error, exceptions.RayTaskError):
        cause = error.cause
        what = f"{type(cause).__module__}.{type(cause).__qualname__}: {_text_of(cause)}"
        return exceptions.RayTaskError(
            error.function_name, error.traceback_str,
            exceptions.UnserializableException(
                f"{what} (the exception could not be serialized to send it back: "
                f"{type(problem).__name__}: {_text_of(problem)})"),
            proctitle=error.proctitle, pid=error.pid, ip=error.ip, actor_repr=error.actor_repr,
            actor_id=error.actor_id, task_id=error.task_id, node_id=error.node_id)
    trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return exceptions.UnserializableException(
        f"{trace.rstrip()}\n(it could not be serialized: {type(problem).__name__}: "
        f"{_text_of(problem)})")
