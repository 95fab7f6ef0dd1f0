"""The node daemon's bookkeeping for its shared-memory object directory.

Creators (drivers, workers) write object files themselves with
``layout.write_object`` into the path that ``ObjectStore.reserve`` hands out;
the daemon then seals them.  The store owns capacity: it moves the least
recently used sealed, unpinned objects to a disk directory when room is
needed and brings them back when they are read.

Disk copies run outside the store's lock so one slow spill does not stall
every other request the daemon is serving.  An object being spilled or
restored is in a transient state; calls that need it in a stable state wait
on a condition variable for the copy to finish.  Readers that mapped an object
before it was spilled or deleted keep a valid mapping (POSIX keeps unlinked
files alive while mapped), so eviction never breaks a live value.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from typing import Optional

from meshray.object_store.eviction import SpillCandidate, choose_spill_victims
from meshray.object_store.layout import read_object_layout
from meshray.object_store.recycle import RECYCLED_SUFFIX, RecyclePool
from meshray.object_store.shm_dirs import make_private_dir

from meshray.exceptions import ObjectStoreFullError

__all__ = [
    "ObjectExistsError",
    "ObjectStateError",
    "ObjectStore",
    "ObjectStoreFullError",
    "UnknownObjectError",
]

logger = logging.getLogger(__name__)

# A pulled copy dropped for room rewrites in place only if nobody asked for it
# this recently (a reader handed its path may be about to map it).
COPY_REUSE_IDLE_S = 1.0
_MAX_ID_BYTES = 127  # hex name must fit a 255-byte file name

# Entry states.  RESERVED: the creator is writing the file.  SEALED: readable
# in shared memory.  SPILLING / RESTORING: a disk copy is in flight.
# SPILLED: the only copy is on disk.
_RESERVED = "reserved"
_SEALED = "sealed"
_SPILLING = "spilling"
_SPILLED = "spilled"
_RESTORING = "restoring"
_TRANSIENT = (_SPILLING, _RESTORING)
_IN_MEMORY = (_RESERVED, _SEALED, _SPILLING)


class UnknownObjectError(KeyError):
    """The store has no object with this id."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "unknown object"


class ObjectStateError(RuntimeError):
    """The request does not fit the object's current state (e.g. reading before seal)."""


class ObjectExistsError(ObjectStateError):
    """An object with this id is already in the store."""


def _hex(object_id: bytes) -> str:
    return object_id.hex()


def _check_id(object_id) -> bytes:
    if not isinstance(object_id, (bytes, bytearray, memoryview)):
        raise TypeError(f"object id must be bytes, got {type(object_id).__name__}")
    oid = bytes(object_id)
    if not 0 < len(oid) <= _MAX_ID_BYTES:
        raise ValueError(
            f"object id must be 1..{_MAX_ID_BYTES} bytes, got {len(oid)} bytes"
        )
    return oid


class _Entry:
    __slots__ = ("object_id", "size", "state", "last_access", "pins", "doomed", "copy",
                 "read_at")

    def __init__(self, object_id: bytes, size: int, state: str, last_access: int):
        self.object_id = object_id
        self.size = size
        self.state = state
        self.last_access = last_access
        self.pins = 0
        self.doomed = False  # deleted before sealing; removed when sealed
        self.copy = False    # pulled from another node: dropped, not spilled (mark_copy)
        self.read_at = 0.0   # time.monotonic() of the last read (ensure_in_memory / touch)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _copy_file(src: str, dst: str) -> None:
    """Copy via a temporary name so a crash never leaves a truncated ``dst``."""
    tmp = f"{dst}.{uuid.uuid4().hex[:12]}.partial"
    try:
        shutil.copyfile(src, tmp)
        os.rename(tmp, dst)
    except BaseException:
        _unlink_quietly(tmp)
        raise


class ObjectStore:
    """Capacity, LRU spilling and pinning for one node's object directory.

    All methods are thread-safe.  Sizes are file sizes as produced by
    ``layout.object_size``; ``capacity_bytes`` bounds the bytes held in shared
    memory, spilled bytes are not counted against it.
    """

    def __init__(self, shm_dir: str, spill_dir: str, capacity_bytes: int):
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self.shm_dir = make_private_dir(shm_dir)
        self.spill_dir = make_private_dir(spill_dir)
        if os.path.samefile(self.shm_dir, self.spill_dir):
            raise ValueError(
                f"shm_dir and spill_dir must differ (both are {self.shm_dir}): "
                f"spilled and in-memory copies share file names"
            )
        self._capacity = int(capacity_bytes)
        self._cond = threading.Condition(threading.Lock())
        self._entries: dict = {}
        self._clock = 0
        self._used = 0  # bytes in shared memory, including reservations
        self._spilling = 0  # part of _used whose disk copy is in flight
        self._spilled = 0  # bytes whose only copy is on disk
        # Ever, for metrics: [objects, bytes] spilled to and restored from disk.
        self._spills = [0, 0]
        self._restores = [0, 0]
        self._closed = False
        # Freed large files kept for reuse (recycle.py); off until the owner
        # says how to tell that nobody maps a file any more.
        self._recycle = RecyclePool(os.path.join(self.shm_dir, ".recycle"),
                                    max_bytes=self._capacity // 2)
        self.mapped = None   # callable(path) -> bool: does any local process map it?
        self.on_copy_dropped = None   # callable(object_id): a copy was dropped for room

    # ---------------------------------------------------------------- paths

    def path_for(self, object_id: bytes) -> str:
        """Where the object's file lives while it is in shared memory."""
        return os.path.join(self.shm_dir, _hex(_check_id(object_id)))

    def _spill_path(self, object_id: bytes) -> str:
        return os.path.join(self.spill_dir, _hex(object_id))

    # --------------------------------------------------------------- create

    def reserve(self, object_id: bytes, size: int, recycled: bool = False) -> str:
        """Make room for a new object and return the path its creator writes to.

        Spills least-recently-used objects if needed.  Reserving the same id
        with the same size again returns the same path, so a retried request
        is harmless; an object id must have one creator at a time. With
        `recycled`, a freed file may be left at path + RECYCLED_SUFFIX for a
        creator that writes with `layout.write_object` (which takes it).
        """
        oid = _check_id(object_id)
        size = self._check_size(size)
        with self._cond:
            self._check_open()
            entry = self._entries.get(oid)
            if entry is not None:
                if entry.state == _RESERVED and entry.size == size:
                    # A retry, or a re-creation of an object deleted before
                    # its first creator sealed it: either way it is wanted.
                    entry.doomed = False
                    entry.last_access = self._tick()
                    return self.path_for(oid)
                raise ObjectExistsError(
                    f"object {_hex(oid)} is already in the store ({entry.state}, "
                    f"{entry.size} bytes)"
                )
            reuse = None
            if recycled:
                reuse = self.path_for(oid) + RECYCLED_SUFFIX
                taken = self._recycle.take(size, reuse)
                self._used -= taken
                reuse = None if taken else reuse
            try:
                victims = self._make_room_locked(oid, size, reuse)
            except BaseException:
                if recycled:   # a file handed out for this reservation goes with it
                    _unlink_quietly(self.path_for(oid) + RECYCLED_SUFFIX)
                raise
            entry = _Entry(oid, size, _RESERVED, self._tick())
            self._entries[oid] = entry
            self._used += size
        try:
            self._spill_entries(victims)
        except OSError as exc:
            self._drop_reservation(entry)
            raise ObjectStoreFullError(
                f"cannot make room for object {_hex(oid)} ({size} bytes): "
                f"spilling to {self.spill_dir} failed: {exc}"
            ) from exc
        return self.path_for(oid)

    def seal(self, object_id: bytes, size: int) -> bool:
        """Make a written object readable, after checking its file is complete.

        The header check catches a creator that died mid-write before any
        reader maps the object.  A file smaller than reserved gives the
        difference back; a larger one is refused because its bytes were never
        accounted for.  Returns False (and removes the file) when the object
        was deleted while its creator was still writing it.
        """
        oid = _check_id(object_id)
        size = self._check_size(size)
        with self._cond:
            self._check_open()
            entry = self._entries.get(oid)
            if entry is None:
                raise UnknownObjectError(
                    f"cannot seal object {_hex(oid)}: it was never reserved "
                    f"(use adopt() for a file written without a reservation)"
                )
            if entry.state != _RESERVED:
                if entry.size == size:
                    return True  # already sealed: a retried request
                raise ObjectStateError(
                    f"cannot seal object {_hex(oid)} as {size} bytes: it is already "
                    f"{entry.state} with {entry.size} bytes"
                )
            reserved = entry.size
            doomed = self._remove_entry_locked(entry) if entry.doomed else None
        if doomed is not None:
            _unlink_quietly(doomed)
            return False
        if size > reserved:
            raise ObjectStateError(
                f"object {_hex(oid)} is {size} bytes but only {reserved} were reserved"
            )
        actual = read_object_layout(self.path_for(oid)).total_size
        if actual != size:
            raise ObjectStateError(
                f"cannot seal object {_hex(oid)}: its creator reported {size} bytes "
                f"but the file holds {actual}"
            )
        with self._cond:
            self._check_open()
            if self._entries.get(oid) is not entry:
                raise UnknownObjectError(
                    f"object {_hex(oid)} was aborted while it was being sealed"
                )
            if entry.doomed:
                doomed = self._remove_entry_locked(entry)
            else:
                self._used -= entry.size - size
                entry.size = size
                entry.state = _SEALED
                entry.last_access = self._tick()
                self._cond.notify_all()
                return True
        _unlink_quietly(doomed)
        return False

    def adopt(self, object_id: bytes) -> int:
        """Take over an object file that already sits at ``path_for(object_id)``.

        For files written without a reservation (or left by a restarted
        daemon).  Returns the object's size.  If no room can be made the file
        is left in place, unaccounted, and ObjectStoreFullError is raised; the
        caller decides whether to delete it.
        """
        oid = _check_id(object_id)
        path = self.path_for(oid)
        size = read_object_layout(path).total_size
        with self._cond:
            self._check_open()
            entry = self._entries.get(oid)
            if entry is not None and entry.state != _RESERVED:
                return entry.size
        if entry is not None:
            self.seal(oid, size)
            return size
        with self._cond:
            self._check_open()
            if oid in self._entries:
                return self._entries[oid].size
            victims = self._make_room_locked(oid, size)
            # RESERVED keeps it out of the victim list while others spill.
            entry = _Entry(oid, size, _RESERVED, self._tick())
            self._entries[oid] = entry
            self._used += size
        try:
            self._spill_entries(victims)
        except OSError as exc:
            self._drop_reservation(entry)
            raise ObjectStoreFullError(
                f"cannot make room to adopt object {_hex(oid)} ({size} bytes): "
                f"spilling to {self.spill_dir} failed: {exc}"
            ) from exc
        doomed = None
        with self._cond:
            if self._entries.get(oid) is entry:
                if entry.doomed:  # deleted while we made room
                    doomed = self._remove_entry_locked(entry)
                else:
                    entry.state = _SEALED
                    self._cond.notify_all()
        if doomed is not None:
            _unlink_quietly(doomed)
        return size

    # ----------------------------------------------------------------- read

    def ensure_in_memory(self, object_id: bytes, pin: bool = False) -> str:
        """Return the shared-memory path of a sealed object, restoring it if spilled.

        Counts as an access for LRU.  With ``pin=True`` the object is pinned in
        the same critical section, so it cannot be spilled again before the
        caller maps it; the caller must ``unpin`` afterwards.
        """
        oid = _check_id(object_id)
        with self._cond:
            entry = self._wait_stable_locked(oid)
            if entry is None:
                raise UnknownObjectError(f"object {_hex(oid)} is not in this store")
            if entry.state == _RESERVED:
                raise ObjectStateError(
                    f"object {_hex(oid)} is not sealed yet; it cannot be read"
                )
            if entry.state == _SEALED:
                entry.last_access = self._tick()
                entry.read_at = time.monotonic()
                entry.pins += bool(pin)
                return self.path_for(oid)
            victims = self._make_room_locked(oid, entry.size)
            entry.state = _RESTORING
            self._used += entry.size
        try:
            self._spill_entries(victims)
        except OSError as exc:
            self._abort_restore(entry)
            raise ObjectStoreFullError(
                f"cannot make room to restore object {_hex(oid)} ({entry.size} bytes): "
                f"spilling to {self.spill_dir} failed: {exc}"
            ) from exc
        spill_path = self._spill_path(oid)
        try:
            _copy_file(spill_path, self.path_for(oid))
        except FileNotFoundError as exc:
            with self._cond:
                if self._entries.get(oid) is entry:
                    del self._entries[oid]
                    self._used -= entry.size
                    self._spilled -= entry.size
                self._cond.notify_all()
            raise UnknownObjectError(
                f"object {_hex(oid)} was spilled to {spill_path} but that file is gone"
            ) from exc
        except BaseException:
            self._abort_restore(entry)
            raise
        # Drop the disk copy while still RESTORING: once SEALED, a new spill of
        # this object may write a fresh copy at the same path.
        _unlink_quietly(spill_path)
        with self._cond:
            if self._entries.get(oid) is entry:
                entry.state = _SEALED
                self._spilled -= entry.size
                self._restores[0] += 1
                self._restores[1] += entry.size
                entry.last_access = self._tick()
                entry.read_at = time.monotonic()
                entry.pins += bool(pin)
            self._cond.notify_all()
        return self.path_for(oid)

    def mark_copy(self, object_id: bytes) -> None:
        """Say that a sealed object is a copy pulled from another node.

        When room is needed, unpinned copies are dropped (least recently used
        first, before anything is spilled): their holder still has the bytes,
        so writing them to disk would be wasted work. ``on_copy_dropped`` is
        told each id dropped so.
        """
        oid = _check_id(object_id)
        with self._cond:
            entry = self._entries.get(oid)
            if entry is not None:
                entry.copy = True

    def touch(self, object_id: bytes) -> None:
        """Record a read that did not go through ``ensure_in_memory``."""
        oid = _check_id(object_id)
        with self._cond:
            entry = self._entries.get(oid)
            if entry is None:
                raise UnknownObjectError(f"object {_hex(oid)} is not in this store")
            entry.last_access = self._tick()
            entry.read_at = time.monotonic()

    def pin(self, object_id: bytes) -> None:
        """Keep an in-memory object from being spilled (counted; pair with ``unpin``)."""
        oid = _check_id(object_id)
        with self._cond:
            entry = self._wait_stable_locked(oid)
            if entry is None:
                raise UnknownObjectError(f"cannot pin object {_hex(oid)}: not in this store")
            if entry.state == _SPILLED:
                raise ObjectStateError(
                    f"cannot pin object {_hex(oid)}: it is spilled to disk; use "
                    f"ensure_in_memory(object_id, pin=True)"
                )
            entry.pins += 1

    def unpin(self, object_id: bytes) -> bool:
        """Release one pin.  Returns False if there was no pin to release.

        Pins are counted per object id and ``delete`` ignores them, so a
        reader's unpin can legitimately arrive after the owner deleted (or
        even re-created) the object; that is answered with False instead of
        an error so neither side has to coordinate with the other.
        """
        oid = _check_id(object_id)
        with self._cond:
            entry = self._entries.get(oid)
            if entry is None or entry.pins == 0:
                return False
            entry.pins -= 1
            return True

    # --------------------------------------------------------------- delete

    def delete(self, object_id: bytes) -> bool:
        """Remove an object wherever it lives.  Returns False if it was unknown.

        Pins do not block deletion: the owner decides an object's lifetime,
        and readers that already mapped it keep a valid mapping.  An object
        still being written is removed when its creator seals it; removing it
        now would let the creator's file appear afterwards, unaccounted.
        """
        oid = _check_id(object_id)
        with self._cond:
            entry = self._wait_stable_locked(oid)
            if entry is None:
                return False
            if entry.state == _RESERVED:
                entry.doomed = True
                return True
            in_memory = entry.state == _SEALED
            doomed = self._remove_entry_locked(entry)
        if in_memory and self._recyclable(doomed, entry.size):
            return True
        _unlink_quietly(doomed)
        return True

    def _recyclable(self, path: str, size: int) -> bool:
        """Keep a freed file's pages for the next large put, if nobody maps it."""
        mapped = self.mapped
        if mapped is None or not self._recycle.wants(size):
            return False
        try:
            if mapped(path):
                return False
        except OSError:
            return False
        with self._cond:
            if self._closed or not self._recycle.offer(path, size):
                return False
            self._used += size
            return True

    def abort(self, object_id: bytes) -> bool:
        """Drop an unsealed reservation at once, with any file already written.

        For when the creator is known to be gone (its worker died): nothing
        will ever seal the object, so waiting for the seal would leak the
        reservation.  Returns False if there was no such reservation.
        """
        oid = _check_id(object_id)
        with self._cond:
            entry = self._entries.get(oid)
            if entry is None:
                return False
            if entry.state != _RESERVED:
                raise ObjectStateError(
                    f"cannot abort object {_hex(oid)}: it is already {entry.state}; "
                    f"use delete()"
                )
            doomed = self._remove_entry_locked(entry)
        _unlink_quietly(doomed)
        return True

    def destroy(self) -> None:
        """Forget every object and remove both directories."""
        with self._cond:
            self._closed = True
            self._entries.clear()
            self._used = self._spilling = self._spilled = 0
            self._cond.notify_all()
        shutil.rmtree(self.shm_dir, ignore_errors=True)
        shutil.rmtree(self.spill_dir, ignore_errors=True)

    # ---------------------------------------------------------------- query

    def contains(self, object_id: bytes) -> bool:
        """True for sealed objects, whether in memory or spilled."""
        oid = _check_id(object_id)
        with self._cond:
            entry = self._entries.get(oid)
            return entry is not None and entry.state != _RESERVED

    def is_spilled(self, object_id: bytes) -> bool:
        """True when the object's only copy is on disk (False if unknown)."""
        oid = _check_id(object_id)
        with self._cond:
            entry = self._entries.get(oid)
            return entry is not None and entry.state in (_SPILLED, _RESTORING)

    def is_pinned(self, object_id: bytes) -> bool:
        oid = _check_id(object_id)
        with self._cond:
            entry = self._entries.get(oid)
            return entry is not None and entry.pins > 0

    def size_of(self, object_id: bytes) -> int:
        oid = _check_id(object_id)
        with self._cond:
            entry = self._entries.get(oid)
            if entry is None:
                raise UnknownObjectError(f"object {_hex(oid)} is not in this store")
            return entry.size

    def object_ids(self) -> list:
        """Ids of all sealed objects (in memory or spilled), e.g. to publish locations."""
        with self._cond:
            return [oid for oid, e in self._entries.items() if e.state != _RESERVED]

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        """Bytes in shared memory, reservations included."""
        with self._cond:
            return self._used

    @property
    def spilled_bytes(self) -> int:
        with self._cond:
            return self._spilled

    @property
    def num_objects(self) -> int:
        """Objects known to the store in any state, reservations included."""
        with self._cond:
            return len(self._entries)

    def stats(self) -> dict:
        """One consistent snapshot of the counters, for metrics and debugging."""
        with self._cond:
            states = [e.state for e in self._entries.values()]
            return {
                "capacity": self._capacity,
                "used_bytes": self._used,
                "spilled_bytes": self._spilled,
                "num_objects": len(states),
                "num_reserved": states.count(_RESERVED),
                "num_in_memory": sum(s in _IN_MEMORY for s in states),
                "num_spilled": sum(s in (_SPILLED, _RESTORING) for s in states),
                "num_pinned": sum(e.pins > 0 for e in self._entries.values()),
                "spill_count": self._spills[0], "spill_bytes_total": self._spills[1],
                "restore_count": self._restores[0], "restore_bytes_total": self._restores[1],
            }

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"ObjectStore({self.shm_dir!r}, objects={s['num_objects']}, "
            f"used={s['used_bytes']}/{s['capacity']}, spilled={s['spilled_bytes']})"
        )

    # ------------------------------------------------------------- internals

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _check_open(self) -> None:
        if self._closed:
            raise ObjectStateError(f"object store {self.shm_dir} has been destroyed")

    @staticmethod
    def _check_size(size) -> int:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"object size must be a non-negative int, got {size!r}")
        return size

    def _wait_stable_locked(self, oid: bytes) -> Optional[_Entry]:
        while True:
            self._check_open()
            entry = self._entries.get(oid)
            if entry is None or entry.state not in _TRANSIENT:
                return entry
            self._cond.wait()

    def _make_room_locked(self, oid: bytes, size: int, reuse: Optional[str] = None) -> list:
        """Choose and mark spill victims so ``size`` more bytes fit; lock held.

        Bytes whose spill is already in flight count as free, so concurrent
        requests don't pick extra victims for room that is about to appear.
        A pulled copy dropped for room may be moved to ``reuse`` (a recycled
        file for the new object) instead of being deleted.
        """
        if size > self._capacity:
            raise ObjectStoreFullError(
                f"object {_hex(oid)} is {size} bytes, larger than the object "
                f"store's whole capacity of {self._capacity} bytes"
            )
        need = size - (self._capacity - (self._used - self._spilling))
        if need > 0 and self._recycle.total:
            freed, paths = self._recycle.evict(need)
            self._used -= freed
            need -= freed
            for path in paths:
                _unlink_quietly(path)
        if need > 0:
            need -= self._drop_copies_locked(need, size, reuse)
        if need <= 0:
            return []
        candidates = [
            SpillCandidate(e.object_id, e.size, e.last_access, e.pins > 0)
            for e in self._entries.values()
            if e.state == _SEALED
        ]
        chosen = choose_spill_victims(candidates, need)
        if chosen is None:
            spillable = sum(c.size for c in candidates if not c.pinned)
            raise ObjectStoreFullError(
                f"object store is full: cannot fit object {_hex(oid)} ({size} bytes); "
                f"{self._used} of {self._capacity} bytes are in use and spilling every "
                f"unpinned sealed object would free only {spillable} of the {need} "
                f"bytes needed (the rest is pinned or still being written)"
            )
        victims = [self._entries[v] for v in chosen]
        for victim in victims:
            victim.state = _SPILLING
            self._spilling += victim.size
        return victims

    def _drop_copies_locked(self, need: int, size: int, reuse: Optional[str]) -> int:
        """Drop unpinned pulled copies, least recently used first; returns bytes freed.

        With ``reuse``, the first dropped file that fits ``size`` (as the
        recycle pool would), that no process maps and that nobody asked for
        in the last COPY_REUSE_IDLE_S (a reader given its path may not have
        mapped it yet) becomes the new object's recycled file, so its
        resident pages are written over instead of freed and allocated again.
        """
        copies = sorted((e for e in self._entries.values()
                         if e.copy and e.state == _SEALED and not e.pins and e.size),
                        key=lambda e: e.last_access)
        freed = 0
        for entry in copies:
            if freed >= need:
                break
            freed += entry.size
            doomed = self._remove_entry_locked(entry)
            if (reuse is not None and self._recycle.min_bytes <= size <= entry.size <= 2 * size
                    and time.monotonic() - entry.read_at >= COPY_REUSE_IDLE_S
                    and self._unmapped(doomed)):
                try:
                    os.rename(doomed, reuse)
                    reuse = None
                except OSError:
                    _unlink_quietly(doomed)
            else:
                _unlink_quietly(doomed)
            if self.on_copy_dropped is not None:
                self.on_copy_dropped(entry.object_id)
        return freed

    def _unmapped(self, path: str) -> bool:
        mapped = self.mapped
        if mapped is None:
            return False
        try:
            return not mapped(path)
        except OSError:
            return False

    def _spill_entries(self, victims: list) -> None:
        """Copy victims to disk and drop them from shared memory; lock not held.

        On the first failure the remaining victims go back to SEALED and the
        error is raised, so the caller can refuse its request.
        """
        error = None
        for victim in victims:
            oid = victim.object_id
            outcome = "reverted"
            if error is None:
                src = self.path_for(oid)
                try:
                    _copy_file(src, self._spill_path(oid))
                    _unlink_quietly(src)
                    outcome = "spilled"
                except OSError as exc:
                    if isinstance(exc, FileNotFoundError) and not os.path.exists(src):
                        logger.warning(
                            "object %s vanished from %s before it could be spilled; "
                            "dropping it", _hex(oid), self.shm_dir
                        )
                        outcome = "lost"
                    else:
                        error = exc
            with self._cond:
                if self._entries.get(oid) is not victim:
                    continue  # store destroyed meanwhile; counters were reset
                self._spilling -= victim.size
                if outcome == "spilled":
                    victim.state = _SPILLED
                    self._used -= victim.size
                    self._spilled += victim.size
                    self._spills[0] += 1
                    self._spills[1] += victim.size
                elif outcome == "lost":
                    del self._entries[oid]
                    self._used -= victim.size
                else:
                    victim.state = _SEALED
                self._cond.notify_all()
        if error is not None:
            raise error

    def _remove_entry_locked(self, entry: _Entry) -> str:
        """Forget ``entry`` and move its file out of the way; returns what to unlink.

        The rename happens under the lock (it is cheap) so that an object
        re-created with the same id can never be the file we unlink; freeing
        the pages, which can take a while for a large file, happens outside.
        """
        oid = entry.object_id
        del self._entries[oid]
        if entry.state == _SPILLED:
            self._spilled -= entry.size
            path = self._spill_path(oid)
        else:
            self._used -= entry.size
            path = self.path_for(oid)
        doomed = f"{path}.{uuid.uuid4().hex[:12]}.deleted"
        try:
            os.rename(path, doomed)
        except FileNotFoundError:
            pass
        if entry.size >= self._recycle.min_bytes:
            _unlink_quietly(path + RECYCLED_SUFFIX)   # given to a creator that never wrote
        self._cond.notify_all()
        return doomed

    def _drop_reservation(self, entry: _Entry) -> None:
        with self._cond:
            if self._entries.get(entry.object_id) is entry:
                del self._entries[entry.object_id]
                self._used -= entry.size
            self._cond.notify_all()

    def _abort_restore(self, entry: _Entry) -> None:
        _unlink_quietly(self.path_for(entry.object_id))
        with self._cond:
            if self._entries.get(entry.object_id) is entry:
                entry.state = _SPILLED
                self._used -= entry.size
            self._cond.notify_all()
