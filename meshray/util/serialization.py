"""Custom serializers for a class (`ray.util.register_serializer`).

A registration changes how *this process* pickles instances of the class:
arguments and ``put()`` values sent from here, and the return values of
tasks run here. It is not sent to workers, as in Ray: a worker that has to
return such instances registers the class too (in the task, or in an
actor's ``__init__``). Reading needs no registration anywhere, because the
deserializer travels inside each pickle, by value when it is defined in
``__main__``.
"""
from __future__ import annotations

from meshray.core import serialization

__all__ = ["register_serializer", "deregister_serializer"]


def register_serializer(cls: type, *, serializer, deserializer) -> None:
    """Serialize instances of `cls` as ``serializer(obj)``; rebuild them with
    ``deserializer(that)``. `deserializer` must itself be serializable."""
    serialization.register_reducer(cls, serializer, deserializer)


def deregister_serializer(cls: type) -> None:
    """Go back to plain pickling for `cls` (no effect when none is registered)."""
    serialization.unregister_reducer(cls)
