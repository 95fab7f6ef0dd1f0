"""The node's lease deadline, shared with its workers through one mapped page.

A node is a member only while its etcd lease lives (DESIGN.md §2). A node
that was paused or cut off past its lease has been declared dead: its peers
retried its tasks and restarted its actors elsewhere. When it resumes, its
own lease keeper needs a round trip to etcd to learn that -- and meanwhile
its actor workers, which callers reach directly, could run calls as an old
incarnation next to the new one.

So the daemon publishes "my lease is certainly valid until T" (a
CLOCK_MONOTONIC time, comparable across processes of one machine, and one
that keeps running while a process is stopped) and every worker checks it
before running a call batch. A resumed node sees T in the past at once, with
no round trip, and refuses; after it registers again T moves forward.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
import time

__all__ = ["LeaseFence", "FENCE_ENV"]

FENCE_ENV = "MESHRAY_LEASE_FENCE"
_FORMAT = "d"
_SIZE = struct.calcsize(_FORMAT)


class LeaseFence:
    """A float64 deadline in a mapped file: the daemon writes, workers read."""

    def __init__(self, path: str, writable: bool):
        self.path = path
        flags = os.O_RDWR | os.O_CREAT if writable else os.O_RDONLY
        fd = os.open(path, flags, 0o600)
        try:
            if writable and os.fstat(fd).st_size < _SIZE:
                os.ftruncate(fd, _SIZE)
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

    def set(self, valid_until: float) -> None:
        self._map[:_SIZE] = struct.pack(_FORMAT, valid_until)

    def revoke(self) -> None:
        self.set(0.0)

    @property
    def valid_until(self) -> float:
        return struct.unpack(_FORMAT, self._map[:_SIZE])[0]

    def valid(self) -> bool:
        return time.monotonic() < self.valid_until

    def close(self) -> None:
        try:
            self._map.close()
        except (BufferError, ValueError):
            pass
