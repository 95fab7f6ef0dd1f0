"""Reusing the pages of freed large objects for the next large put.

On tmpfs a write into fresh pages costs the kernel an allocation and a
zero-fill per page before the copy; a write into a file whose pages are
already resident is a plain copy (about 3x faster here for 100 MiB). So the
store keeps a few freed large files, and a new reservation of a similar size
takes one: the daemon renames it next to the object's path with
RECYCLED_SUFFIX, and `layout.write_object` overwrites it in place.

A freed file may be recycled only when no process still maps it -- a reader
may keep a numpy view of an object after every ref to it is gone, and
overwriting the pages under it would change its data. The store asks a
`mapped` callback (the daemon scans its local processes' memory maps) and
recycles nothing without one. The pool's bytes stay counted as used; they
are the first thing given up when room is needed.
"""
from __future__ import annotations

import os
import uuid

__all__ = ["RecyclePool", "RECYCLED_SUFFIX", "RECYCLE_MIN_BYTES"]

RECYCLED_SUFFIX = ".recycled"
RECYCLE_MIN_BYTES = 16 * 1024 * 1024      # smaller files are cheap to make fresh
_SLACK = 2                                # a file up to 2x the request may serve it


class RecyclePool:
    """Freed files kept for reuse; not thread-safe (the store's lock guards it)."""

    def __init__(self, directory: str, max_bytes: int, min_bytes: int = RECYCLE_MIN_BYTES):
        self.directory = directory
        self.max_bytes = max_bytes
        self.min_bytes = min_bytes
        self.total = 0
        self._files: list[tuple[int, str]] = []

    def wants(self, size: int) -> bool:
        return size >= self.min_bytes and self.total + size <= self.max_bytes

    def offer(self, path: str, size: int) -> bool:
        """Keep the file at `path` (moving it into the pool); False leaves it alone."""
        if not self.wants(size):
            return False
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        kept = os.path.join(self.directory, uuid.uuid4().hex)
        try:
            os.rename(path, kept)
        except OSError:
            return False
        self._files.append((size, kept))
        self.total += size
        return True

    def take(self, size: int, dest: str) -> int:
        """Move the best file for `size` bytes to `dest`; returns its size (0: none fits)."""
        if size < self.min_bytes:
            return 0
        fitting = [entry for entry in self._files if size <= entry[0] <= _SLACK * size]
        if not fitting:
            return 0
        entry = min(fitting)
        self._files.remove(entry)
        self.total -= entry[0]
        try:
            os.rename(entry[1], dest)
        except OSError:
            return 0
        return entry[0]

    def evict(self, need: int) -> tuple[int, list]:
        """Give up files (largest first) until `need` bytes are freed: (freed, paths)."""
        freed, paths = 0, []
        self._files.sort()
        while self._files and freed < need:
            size, path = self._files.pop()
            self.total -= size
            freed += size
            paths.append(path)
        return freed, paths
