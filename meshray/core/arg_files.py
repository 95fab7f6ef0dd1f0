"""Large actor-call arguments, passed through shared memory on the same node.

A call whose pickled arguments are large is not sent as one big in-band
pickle (copied by the pickler, by protobuf, by gRPC on both sides, and
deserialized into fresh memory by the actor).  Instead its arguments are laid
out as an *object image* -- the store's file format (object_store/layout.py):
the in-band pickle plus the out-of-band buffers (numpy arrays, bytearrays) --
and the actor rebuilds them zero-copy, so numpy arrays arrive as read-only
views, as they do in Ray.

- Actor on the caller's node: the caller writes the image to a file in the
  node store's ``args/`` directory and the call carries only the file's name
  (``TaskSpec.args_file``).  The actor maps the file read-only when the call
  arrives.  The caller owns the file: it unlinks it when the call is answered
  or finally fails (a mapping stays valid after unlink, so the actor's views
  stay good).  No daemon round trip is involved.
- Actor elsewhere (or not located yet): the image travels inline in
  ``TaskSpec.args_blob`` (``args_image`` set).

Fresh tmpfs pages are expensive (allocated and zeroed on write, freed on
unlink; several times the cost of the copy itself), so files are recycled:
when the actor's reply says it no longer maps the file
(``TaskResult.args_released``: nothing built from the arguments outlived the
call), the caller keeps the file in a small per-process pool
(``POOL_BYTES``, idle files dropped after ``POOL_IDLE_S``) and overwrites it
for a later call.  A file whose call was sent more than once (stream broken,
actor restarted) is never reused: an earlier recipient might still map it.

Files are named after the process and the core worker (connection to the
node) that wrote them (meshray.common.arg_dir), so when a caller dies without
cleaning up (SIGKILL) the node removes its files once that connection closes.
"""
from __future__ import annotations

import itertools
import logging
import os
import pickle
import threading
import time

from meshray.common.arg_dir import args_dir, check_name, file_prefix, unlink
from meshray.core import serialization
from meshray.core.object_ref import substitute_refs
from meshray.object_store import layout

__all__ = [
    "FILE_THRESHOLD",
    "MAX_IMAGE_BYTES",
    "CallArgs",
    "build_call_args",
    "image_bytes",
    "write",
    "release",
    "drop_pool",
    "read_file_bytes",
    "map_file",
    "unpack_inline",
    "load",
]

log = logging.getLogger(__name__)

# Arguments whose serialized size is above this travel as an image (Ray puts
# arguments above the same 100 KiB into shared memory).
FILE_THRESHOLD = serialization.INLINE_THRESHOLD
# Above this, arguments go through the object store as separate objects.
MAX_IMAGE_BYTES = 8 * 1024 * 1024
# Released files kept for reuse, per process, at most this many bytes ...
POOL_BYTES = 64 * 1024 * 1024
# ... and for at most this long unused.
POOL_IDLE_S = 10.0

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class CallArgs:
    """What an actor call carries for its arguments."""

    __slots__ = ("blob", "image", "file", "arg_refs", "contained", "keepalive")

    def __init__(self, blob, arg_refs, contained, keepalive, *, image=False, file=""):
        self.blob = blob
        self.image = image
        self.file = file
        self.arg_refs = arg_refs
        self.contained = contained
        self.keepalive = keepalive


def build_call_args(core, args: tuple, kwargs: dict, name: str, *, same_node: bool) -> CallArgs:
    """Serialize an actor call's arguments; large ones become an image (file or inline).

    Small arguments come back as a plain in-band pickle, exactly as
    ``core.build_args`` makes them.  ``same_node`` says the actor is known to
    live on this node (so a file in the node's store directory reaches it).
    """
    if not args and not kwargs:
        return CallArgs(*core.build_args(args, kwargs, name))
    new_args, new_kwargs, arg_refs, keepalive = substitute_refs(args, kwargs)
    try:
        serialized = serialization.serialize((new_args, new_kwargs),
                                             what=f"the arguments of {name}",
                                             inline_limit=FILE_THRESHOLD)
    except TypeError:
        # build_args says which argument could not be pickled.
        return CallArgs(*core.build_args(args, kwargs, name, inline_limit=MAX_IMAGE_BYTES))
    if not serialized.is_inline and serialized.total_bytes > MAX_IMAGE_BYTES:
        # Very large: one store object per big argument, as for tasks.
        return CallArgs(*core.build_args(args, kwargs, name, inline_limit=MAX_IMAGE_BYTES))
    core.ensure_registered(arg_refs)
    core.ensure_registered(serialized.contained_ids)
    if serialized.is_inline:
        return CallArgs(serialized.inband, arg_refs, serialized.contained_ids, keepalive)
    if same_node and core.store_dir:
        try:
            file = write(core.store_dir, core.worker_id, serialized.inband, serialized.buffers)
        except OSError as exc:
            # Full or unusable shared memory: the inline image still works.
            log.debug("could not write an argument file (%s); sending inline", exc)
        else:
            return CallArgs(b"", arg_refs, serialized.contained_ids, keepalive,
                            image=True, file=file)
    blob = image_bytes(serialized.inband, serialized.buffers)
    return CallArgs(blob, arg_refs, serialized.contained_ids, keepalive, image=True)


def image_bytes(inband, buffers) -> bytes:
    """The image as one bytes object (for ``args_blob``)."""
    size = layout.object_size(len(inband), [memoryview(b).nbytes for b in buffers])
    out = bytearray(size)
    layout.write_object_into(out, inband, buffers)
    return bytes(out)


# ------------------------------------------------------------------ files
class _Writer:
    """This process's argument files in one store directory: names, sizes, pool."""

    def __init__(self, store_dir: str, owner: bytes):
        self.pid = os.getpid()
        self.directory = args_dir(store_dir)
        self.prefix = file_prefix(self.pid, owner)
        self.counter = itertools.count(1)
        self.lock = threading.Lock()
        self.sizes: dict = {}    # name -> size, every file of ours that exists
        self.free: dict = {}     # size -> [(name, released at)], oldest first
        self.free_bytes = 0
        self.timer = None        # expires idle files when no call comes to do it
        os.makedirs(self.directory, mode=0o700, exist_ok=True)

    def take(self, size: int):
        """A pooled file to overwrite: (name, its current size), or None."""
        with self.lock:
            self._expire(time.monotonic())
            names = self.free.get(size)
            if not names:
                # Any pooled file will do; it is resized (rarely needed: a
                # caller tends to pass arguments of the same size again).
                size = next(iter(self.free), None)
                if size is None:
                    return None
                names = self.free[size]
            name, _ = names.pop()
            if not names:
                del self.free[size]
            self.free_bytes -= size
            return name, size

    def give_back(self, name: str) -> bool:
        """Pool a released file; False if the pool is full (the caller removes it)."""
        with self.lock:
            size = self.sizes.get(name)
            if size is None or self.free_bytes + size > POOL_BYTES:
                return False
            now = time.monotonic()
            self.free.setdefault(size, []).append((name, now))
            self.free_bytes += size
            self._expire(now)
            if self.timer is None:
                self._arm()
            return True

    def _arm(self) -> None:
        self.timer = threading.Timer(POOL_IDLE_S + 0.5, self._on_timer)
        self.timer.daemon = True
        self.timer.start()

    def _on_timer(self) -> None:
        with self.lock:
            self.timer = None
            self._expire(time.monotonic())
            if self.free:
                self._arm()

    def _expire(self, now: float) -> None:
        for size in list(self.free):
            names = self.free[size]
            while names and now - names[0][1] > POOL_IDLE_S:
                name, _ = names.pop(0)
                self.free_bytes -= size
                self.sizes.pop(name, None)
                unlink(os.path.join(self.directory, name))
            if not names:
                del self.free[size]

    def forget(self, name: str) -> None:
        with self.lock:
            self.sizes.pop(name, None)

    def drop_pool(self) -> None:
        with self.lock:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            free, self.free, self.free_bytes = self.free, {}, 0
            for names in free.values():
                for name, _ in names:
                    self.sizes.pop(name, None)
                    unlink(os.path.join(self.directory, name))


_writers: dict = {}
_writers_lock = threading.Lock()


def _writer(store_dir: str, owner: bytes, create: bool = True):
    key = (store_dir, owner)
    writer = _writers.get(key)
    if writer is None or writer.pid != os.getpid():
        if not create:
            return None
        with _writers_lock:
            writer = _writers.get(key)
            if writer is None or writer.pid != os.getpid():
                writer = _writers[key] = _Writer(store_dir, owner)
    return writer


def write(store_dir: str, owner: bytes, inband, buffers) -> str:
    """Write an image into an argument file (a pooled one if any); returns its name.

    ``owner`` is the writing core worker's id (the node sweeps by it).
    """
    writer = _writer(store_dir, owner)
    inband_view = layout._as_bytes_view(inband)
    views = [layout._as_bytes_view(b) for b in buffers]
    plan = layout.ObjectLayout.plan(len(inband_view), [len(v) for v in views])
    size = plan.total_size
    pooled = writer.take(size)
    if pooled is not None:
        name, old_size = pooled
        flags = os.O_WRONLY | _O_CLOEXEC
    else:
        name, old_size = f"{writer.prefix}{next(writer.counter)}", size
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC
    path = os.path.join(writer.directory, name)
    # The actor opens the file only after the call naming it is sent (and a
    # pooled file only once no actor maps it), so it is written in place: no
    # temporary name, one vectored write.
    try:
        fd = os.open(path, flags, 0o600)
        try:
            if old_size != size:
                os.ftruncate(fd, size)
            pieces = [memoryview(plan.header_bytes())] + plan.pieces(inband_view, views)
            layout._pwrite_all(fd, pieces, 0)
        finally:
            os.close(fd)
    except BaseException:
        writer.forget(name)
        unlink(path)
        raise
    with writer.lock:
        writer.sizes[name] = size
    return name


def release(store_dir: str, owner: bytes, name: str, *, reusable: bool = False) -> None:
    """The call that used this file is over: pool it if ``reusable``, else remove it.

    ``reusable`` only when the one actor the call went to said it no longer
    maps the file.
    """
    if not name:
        return
    writer = _writer(store_dir, owner, create=False)
    if reusable and writer is not None and writer.give_back(name):
        return
    if writer is not None:
        writer.forget(name)
    unlink(os.path.join(args_dir(store_dir), name))


def drop_pool(store_dir: str, owner: bytes) -> None:
    """Remove the pooled files of this core worker (at shutdown)."""
    writer = _writer(store_dir, owner, create=False)
    if writer is not None:
        writer.drop_pool()


def read_file_bytes(store_dir: str, name: str) -> bytes:
    """The image in a file, as bytes (to send it inline instead)."""
    check_name(name)
    with open(os.path.join(args_dir(store_dir), name), "rb") as handle:
        return handle.read()


def map_file(store_dir: str, name: str) -> tuple:
    """Map an argument file read-only: (in-band, buffers) views, zero-copy."""
    check_name(name)
    return layout.read_object(os.path.join(args_dir(store_dir), name))


def unpack_inline(blob) -> tuple:
    return layout.unpack_object(blob, where="inline actor-call arguments")


def load(image: tuple):
    """Rebuild (args, kwargs) from an image; numpy arrays stay views into it."""
    inband, buffers = image
    return pickle.loads(inband, buffers=buffers)

