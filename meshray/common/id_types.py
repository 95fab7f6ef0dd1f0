"""Id objects with Ray's names and methods (`meshray.ActorID`, `NodeID`, ...).

Ray programs compare, hash, print and rebuild ids with `hex()`,
`from_hex()`, `binary()` and `nil()`; the runtime context's deprecated
`*_id` properties return these objects. The byte widths are meshray's own
(see common/ids.py), not Ray's: an id round-trips through hex within one
meshray cluster, which is what programs rely on. A nil id is all 0xff bytes,
as in Ray.
"""
from __future__ import annotations

import os

from meshray.common import ids

__all__ = [
    "BaseID", "UniqueID", "JobID", "NodeID", "WorkerID", "TaskID", "ActorID", "FunctionID",
    "ActorClassID", "ClusterID", "PlacementGroupID",
]


class BaseID:
    """Bytes of a fixed width, compared and hashed by class and value."""

    SIZE = 16
    __slots__ = ("_bytes",)

    def __init__(self, id_bytes: bytes):
        if isinstance(id_bytes, (bytearray, memoryview)):
            id_bytes = bytes(id_bytes)
        if not isinstance(id_bytes, bytes):
            raise TypeError(f"{type(self).__name__} needs bytes, got {type(id_bytes).__name__}")
        if len(id_bytes) != self.SIZE:
            raise ValueError(f"{type(self).__name__} must be {self.SIZE} bytes, got "
                             f"{len(id_bytes)} ({id_bytes.hex()!r})")
        self._bytes = id_bytes

    @classmethod
    def size(cls) -> int:
        return cls.SIZE

    @classmethod
    def from_binary(cls, id_bytes: bytes):
        return cls(id_bytes)

    @classmethod
    def from_hex(cls, hex_id):
        if isinstance(hex_id, bytes):
            hex_id = hex_id.decode("ascii", "replace")
        try:
            raw = bytes.fromhex(hex_id)
        except (TypeError, ValueError):
            raise ValueError(f"{cls.__name__}.from_hex() expected {2 * cls.SIZE} hex digits, "
                             f"got {hex_id!r}") from None
        return cls(raw)

    @classmethod
    def from_random(cls):
        return cls(os.urandom(cls.SIZE))

    @classmethod
    def nil(cls):
        return cls(b"\xff" * cls.SIZE)

    def is_nil(self) -> bool:
        return self._bytes == b"\xff" * self.SIZE

    def binary(self) -> bytes:
        return self._bytes

    def hex(self) -> str:
        return self._bytes.hex()

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other._bytes == self._bytes

    def __ne__(self, other) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._bytes))

    def __reduce__(self):
        return (type(self), (self._bytes,))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.hex()})"

    __str__ = __repr__


class UniqueID(BaseID):
    pass


class JobID(BaseID):
    SIZE = 8


class NodeID(BaseID):
    pass


class WorkerID(BaseID):
    pass


class TaskID(BaseID):
    SIZE = ids.TASK_ID_LEN


class ActorID(BaseID):
    """An actor's id: minted like a task id, so it names its owner's node too."""

    SIZE = ids.TASK_ID_LEN


class FunctionID(BaseID):
    pass


class ActorClassID(BaseID):
    pass


class ClusterID(BaseID):
    pass


class PlacementGroupID(BaseID):
    """A placement group's id: the key of all of the group's records.

    It begins with the prefix of the node it was created on (as a task id
    does), the rest random: the nodes that follow a slice of the groups
    (node/group_follow.py) follow the slice their own id is in, so the node
    a group is created on follows it with no extra watch.
    """

    @classmethod
    def for_node(cls, node_id: bytes) -> "PlacementGroupID":
        """A new id for a group created on `node_id` (random where unknown)."""
        if len(node_id) < ids.NODE_PREFIX_LEN:
            return cls.from_random()
        return cls(node_id[:ids.NODE_PREFIX_LEN]
                   + os.urandom(cls.SIZE - ids.NODE_PREFIX_LEN))

    @classmethod
    def from_hex(cls, hex_id) -> "PlacementGroupID":
        try:
            return super().from_hex(hex_id)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"not a placement group id: {hex_id!r} ({exc})") from None
