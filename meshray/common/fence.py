"""The node's lease deadline, shared with its workers through one mapped page.

A node is a member only while its etcd lease lives. A node
that was paused or cut off past its lease has been declared dead: its peers
retried its tasks and restarted its actors elsewhere. When it resumes, its
own lease keeper needs a round trip to etcd to learn that -- and meanwhile
its actor workers, which callers reach directly, could run calls as an old
incarnation next to the new one.

So the daemon publishes "my lease is certainly valid until T" (a
CLOCK_MONOTONIC time, comparable across processes of one machine, and one
that keeps running while a process is stopped) and the id of that lease.
An actor that a peer could replace checks it before running a call batch. A
resumed node sees T in the past at once, with no round trip, and refuses;
after it registers again T moves forward -- under a new lease id, which such
an actor, bound to the lease it was created under, never accepts (its owner
has restarted it elsewhere or declared it dead by then).

Which actors are fenced is decided in `fence_applies`: only those created
for another node. An actor created on its own node is restarted only by
that node (peers restart the actors *they* created, docs/architecture.md),
so while this node lives no replacement can exist, and refusing its calls
during an etcd stall would only turn a coordination hiccup into failed calls.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
import time

__all__ = ["LeaseFence", "FENCE_ENV", "fence_applies"]

FENCE_ENV = "MESHRAY_LEASE_FENCE"
_DEADLINE = struct.Struct("d")
_LEASE = struct.Struct("Q")
_LEASE_AT = _DEADLINE.size
_SIZE = _DEADLINE.size + _LEASE.size


def fence_applies(creation_task_id: bytes, node_id: bytes, prefix_len: int) -> bool:
    """True when the actor's creator is another node, which may restart it.

    A task id starts with the id prefix of the node it was submitted on, and
    an actor's creation spec keeps its task id through every restart.
    """
    return bytes(creation_task_id[:prefix_len]) != bytes(node_id[:prefix_len])


class LeaseFence:
    """(deadline, lease id) in a mapped file: the daemon writes, workers read."""

    def __init__(self, path: str, writable: bool):
        self.path = path
        flags = os.O_RDWR | os.O_CREAT if writable else os.O_RDONLY
        fd = os.open(path, flags, 0o600)
        try:
            if writable and os.fstat(fd).st_size < _SIZE:
                os.ftruncate(fd, _SIZE)
            if os.fstat(fd).st_size < _SIZE:
                raise OSError(f"lease fence {path} is shorter than {_SIZE} bytes")
            access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
            self._map = mmap.mmap(fd, _SIZE, access=access)
        finally:
            os.close(fd)

    @classmethod
    def create(cls, path: str) -> "LeaseFence":
        """The daemon's side; open until the first registration says otherwise."""
        fence = cls(path, writable=True)
        fence.set(math.inf)
        return fence

    @classmethod
    def from_env(cls) -> "LeaseFence | None":
        """A worker's side, when its daemon published a fence."""
        path = os.environ.get(FENCE_ENV)
        if not path:
            return None
        try:
            return cls(path, writable=False)
        except OSError:
            return None

    def set(self, valid_until: float, lease_id: int | None = None) -> None:
        """Publish a deadline, and with `lease_id` the lease it belongs to.

        The lease id is written first: a reader that sees the new deadline
        then sees the new id too, so it never takes a deadline of the new
        lease for one of the old.
        """
        if lease_id is not None:
            self._map[_LEASE_AT:_SIZE] = _LEASE.pack(lease_id)
        self._map[:_LEASE_AT] = _DEADLINE.pack(valid_until)

    def revoke(self) -> None:
        self.set(0.0)

    @property
    def valid_until(self) -> float:
        return _DEADLINE.unpack(self._map[:_LEASE_AT])[0]

    @property
    def lease_id(self) -> int:
        """The lease the deadline belongs to (0 before the first registration)."""
        return _LEASE.unpack(self._map[_LEASE_AT:_SIZE])[0]

    def valid(self, lease_id: int | None = None) -> bool:
        """The lease is certainly alive now (and, given `lease_id`, is that lease)."""
        if lease_id is None:
            return time.monotonic() < self.valid_until
        before = self.lease_id
        deadline = self.valid_until
        # Read around the deadline: a change of lease in between means a
        # registration was being written; refuse this once, as a lapse.
        return before == lease_id == self.lease_id and time.monotonic() < deadline

    def close(self) -> None:
        try:
            self._map.close()
        except (BufferError, ValueError):
            pass
