"""On-file format of one object in the node's shared-memory directory.

Every process that creates or reads objects (drivers, workers, the node daemon)
uses this module, so it depends on nothing but the standard library.

A serialized value is pickle protocol 5 "in-band" bytes plus a list of
out-of-band buffers.  Each object is one file::

    offset 0    fixed header (48 bytes, little-endian)
                  magic        8s   b"MSHRAYOB"
                  version      u16  FORMAT_VERSION
                  flags        u16  0 (reserved)
                  num_buffers  u32
                  total_size   u64  exact file size
                  inband_off   u64
                  inband_len   u64
                  header_crc   u32  CRC-32 of the header (this field zeroed)
                                    and the buffer table
                  reserved     u32  0
    offset 48   buffer table: num_buffers x (offset u64, length u64)
    aligned     in-band pickle bytes, then each buffer, every region starting
                on a 64-byte boundary; padding bytes are zero.

Regions start on 64-byte boundaries so arrays mapped from the file are
aligned for SIMD loads.  The file ends at the last byte of the last region,
so ``total_size`` equals the file size and a truncated copy is detectable.

Files are written under a temporary name in the same directory and renamed
into place: readers either see nothing or a complete file, and replacing a
file never truncates pages that another process still has mapped (which would
make its reads fault with SIGBUS).
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import pickle
import struct
import sys
import threading
import uuid
import zlib
from dataclasses import dataclass
from typing import Iterator, Sequence, Union

from meshray.object_store.recycle import RECYCLE_MIN_BYTES, RECYCLED_SUFFIX

__all__ = [
    "ALIGNMENT",
    "FORMAT_VERSION",
    "MAGIC",
    "ChunkWriter",
    "CorruptObjectError",
    "ObjectLayout",
    "copy_file_chunks",
    "object_size",
    "read_object",
    "read_object_layout",
    "unpack_object",
    "write_object",
    "write_object_into",
]

MAGIC = b"MSHRAYOB"
FORMAT_VERSION = 1
ALIGNMENT = 64

_FIXED = struct.Struct("<8sHHIQQQII")
_ENTRY = struct.Struct("<QQ")
_CRC_OFFSET = 40  # position of header_crc inside _FIXED
assert _FIXED.size == 48

# Linux caps one write at 2 GiB - 4 KiB and IOV_MAX at 1024; staying below
# both keeps every syscall a full write in the common case.
_MAX_WRITE = 1 << 30
_MAX_IOV = 1024
_ZEROS = bytes(ALIGNMENT)
_PARTIAL_SUFFIX = ".partial"

BufferLike = Union[bytes, bytearray, memoryview, pickle.PickleBuffer]


class CorruptObjectError(ValueError):
    """An object file is truncated, foreign or damaged.

    Subclasses ValueError so callers that treat malformed input generically
    still catch it; the message always names the file.
    """


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) & ~(ALIGNMENT - 1)


@dataclass(frozen=True)
class ObjectLayout:
    """Where each region of an object file lives.

    Computed once from region lengths so writers, readers and the store agree
    on sizes without touching the data.
    """

    header_len: int
    inband_offset: int
    inband_len: int
    buffer_offsets: tuple
    buffer_lens: tuple
    total_size: int

    @classmethod
    def plan(cls, inband_len: int, buffer_lens: Sequence[int]) -> "ObjectLayout":
        if inband_len < 0 or any(n < 0 for n in buffer_lens):
            raise ValueError(
                f"region lengths must be >= 0, got in-band {inband_len}, "
                f"buffers {list(buffer_lens)}"
            )
        header_len = _align(_FIXED.size + _ENTRY.size * len(buffer_lens))
        inband_offset = header_len
        end = inband_offset + inband_len
        offsets = []
        for n in buffer_lens:
            start = _align(end)
            offsets.append(start)
            end = start + n
        return cls(
            header_len=header_len,
            inband_offset=inband_offset,
            inband_len=inband_len,
            buffer_offsets=tuple(offsets),
            buffer_lens=tuple(buffer_lens),
            total_size=end,
        )

    def header_bytes(self) -> bytes:
        table = b"".join(
            _ENTRY.pack(o, n) for o, n in zip(self.buffer_offsets, self.buffer_lens)
        )
        fixed = _FIXED.pack(
            MAGIC,
            FORMAT_VERSION,
            0,
            len(self.buffer_lens),
            self.total_size,
            self.inband_offset,
            self.inband_len,
            0,
            0,
        )
        crc = zlib.crc32(table, zlib.crc32(fixed))
        fixed = fixed[:_CRC_OFFSET] + struct.pack("<I", crc) + fixed[_CRC_OFFSET + 4 :]
        header = fixed + table
        return header + bytes(self.header_len - len(header))

    def pieces(self, inband: memoryview, buffers: Sequence[memoryview]) -> list:
        """Body regions (after the header) in file order, with zero padding."""
        out = []
        pos = self.inband_offset
        regions = [(self.inband_offset, inband)]
        regions += list(zip(self.buffer_offsets, buffers))
        for offset, data in regions:
            if offset > pos:
                out.append(memoryview(_ZEROS)[: offset - pos])
            if len(data):
                out.append(data)
            pos = offset + len(data)
        return out


def object_size(inband_len: int, buffer_lens: Sequence[int]) -> int:
    """Size of the file that ``write_object`` will produce, for reserving space first."""
    return ObjectLayout.plan(inband_len, buffer_lens).total_size


def _as_bytes_view(data) -> memoryview:
    """Flat unsigned-byte view of any contiguous buffer, without copying.

    PickleBuffer.raw() handles C- and Fortran-contiguous exporters alike, which
    is what numpy hands to protocol-5 buffer callbacks.
    """
    if isinstance(data, memoryview) and data.format == "B" and data.ndim == 1:
        if data.contiguous:
            return data
    pb = data if isinstance(data, pickle.PickleBuffer) else pickle.PickleBuffer(data)
    try:
        return pb.raw()
    except BufferError as exc:
        raise BufferError(
            "object buffers must be contiguous; pickle protocol 5 only emits "
            "contiguous out-of-band buffers, so a non-contiguous one here means "
            "the caller built the buffer list by hand"
        ) from exc


def _pwrite_all(fd: int, pieces: list, offset: int) -> None:
    """Write consecutive pieces at ``offset``, batching them into few syscalls."""
    pieces = [p for p in pieces if len(p)]
    use_vectored = hasattr(os, "pwritev")
    i = 0
    while i < len(pieces):
        if use_vectored:
            batch = []
            nbytes = 0
            j = i
            while j < len(pieces) and len(batch) < _MAX_IOV and nbytes < _MAX_WRITE:
                batch.append(pieces[j])
                nbytes += len(pieces[j])
                j += 1
            written = os.pwritev(fd, batch, offset)
        else:
            written = os.pwrite(fd, pieces[i][:_MAX_WRITE], offset)
        if written <= 0:
            raise OSError(f"write of object data made no progress at offset {offset}")
        offset += written
        while written:
            head = pieces[i]
            if written >= len(head):
                written -= len(head)
                i += 1
            else:
                pieces[i] = head[written:]
                written = 0


def _partial_path(path: str) -> str:
    return f"{path}.{os.getpid()}-{uuid.uuid4().hex[:12]}{_PARTIAL_SUFFIX}"


def write_object(path: str, inband, buffers: Sequence[BufferLike]) -> int:
    """Write a serialized object to ``path`` and return the file size.

    Data goes straight from the caller's buffers to the file with vectored
    ``pwrite`` calls: no concatenation, and on tmpfs this beats copying into
    a fresh shared mapping because it avoids one page fault per 4 KiB page.
    The file appears at ``path`` only once complete (see module docstring).
    """
    inband_view = _as_bytes_view(inband)
    views = [_as_bytes_view(b) for b in buffers]
    layout = ObjectLayout.plan(len(inband_view), [len(v) for v in views])
    tmp = _partial_path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    if layout.total_size >= RECYCLE_MIN_BYTES:
        try:
            # The store may have left a freed file's resident pages here for
            # us (recycle.py): overwriting them skips the kernel's zero-fill.
            os.rename(path + RECYCLED_SUFFIX, tmp)
            flags &= ~(os.O_CREAT | os.O_EXCL)
        except FileNotFoundError:
            pass
    fd = os.open(tmp, flags, 0o600)
    try:
        try:
            os.ftruncate(fd, layout.total_size)
            _pwrite_all(fd, layout.pieces(inband_view, views), layout.inband_offset)
            _pwrite_all(fd, [memoryview(layout.header_bytes())], 0)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return layout.total_size


def write_object_into(dest, inband, buffers: Sequence[BufferLike]) -> int:
    """Lay a serialized object out in a caller-provided writable buffer.

    For callers that already hold a writable mapping (or want the whole
    object as one in-memory blob, e.g. for an inline reply).  ``dest`` must be
    at least ``object_size(...)`` bytes; returns the number of bytes used.
    """
    out = memoryview(dest)
    if out.readonly:
        raise TypeError("write_object_into needs a writable buffer")
    out = out.cast("B") if (out.format != "B" or out.ndim != 1) else out
    inband_view = _as_bytes_view(inband)
    views = [_as_bytes_view(b) for b in buffers]
    layout = ObjectLayout.plan(len(inband_view), [len(v) for v in views])
    if len(out) < layout.total_size:
        raise ValueError(
            f"destination holds {len(out)} bytes but the object needs {layout.total_size}"
        )
    pos = layout.inband_offset
    for piece in layout.pieces(inband_view, views):
        out[pos : pos + len(piece)] = piece
        pos += len(piece)
    out[: layout.header_len] = layout.header_bytes()
    return layout.total_size


# --------------------------------------------------------------------------
# Read-only mappings
#
# Python < 3.13's mmap.mmap keeps a duplicate of the file descriptor open for
# as long as the mapping lives.  A process holding thousands of zero-copy
# arrays would then hold thousands of descriptors and hit EMFILE under the
# usual 1024 soft limit.  Where libc is reachable through ctypes we map the
# file ourselves and close the descriptor at once; the memoryview's exporter
# is a ctypes array that owns the mapping and unmaps it when the last view
# is gone.


class _Mapping:
    """Owns one libc mapping; unmapping happens when the exporter is collected."""

    __slots__ = ("address", "length")

    def __init__(self, address: int, length: int):
        self.address = address
        self.length = length

    def __del__(self):
        munmap = _LIBC_MUNMAP
        if self.address and munmap is not None:
            munmap(self.address, self.length)
            self.address = 0


def _load_libc():
    if not sys.platform.startswith(("linux", "darwin")):
        return None, None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        do_mmap = libc.mmap
        do_munmap = libc.munmap
    except (OSError, AttributeError):
        return None, None
    do_mmap.restype = ctypes.c_void_p
    do_mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    do_munmap.restype = ctypes.c_int
    do_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return do_mmap, do_munmap


_LIBC_MMAP, _LIBC_MUNMAP = _load_libc()
_MAP_FAILED = ctypes.c_void_p(-1).value


def _quantize(n: int) -> int:
    """Round a mapping length up to one of a few hundred distinct sizes.

    ctypes caches every array type it creates forever, so one type per exact
    object size would leak; 16 steps per power of two bound both the number
    of types and the wasted address space (< 7 %, never touched).
    """
    step = 1 << max(12, n.bit_length() - 4)
    return (n + step - 1) // step * step


def _map_with_libc(fd: int, size: int) -> memoryview:
    length = _quantize(size)
    address = _LIBC_MMAP(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if address is None or address == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {length} bytes failed: {os.strerror(err)}")
    owner = _Mapping(address, length)
    exporter = (ctypes.c_ubyte * length).from_address(address)
    exporter._meshray_mapping = owner  # the view keeps the exporter, which keeps this
    return memoryview(exporter).cast("B")[:size].toreadonly()


def _map_with_mmap_module(fd: int, size: int) -> memoryview:
    kwargs = {"trackfd": False} if sys.version_info >= (3, 13) else {}
    return memoryview(mmap.mmap(fd, size, access=mmap.ACCESS_READ, **kwargs))


def _default_backend() -> str:
    if sys.version_info >= (3, 13) or _LIBC_MMAP is None:
        return "mmap"
    return "libc"


# Module-level so tests (and an operator chasing a platform problem) can force
# the portable implementation.
map_backend = _default_backend()


def _map_readonly(fd: int, size: int) -> memoryview:
    if map_backend == "libc" and _LIBC_MMAP is not None:
        return _map_with_libc(fd, size)
    return _map_with_mmap_module(fd, size)


def _parse_header(head: memoryview, file_size: int, where: str) -> ObjectLayout:
    if file_size < _FIXED.size or len(head) < _FIXED.size:
        raise CorruptObjectError(
            f"{where}: truncated object file ({file_size} bytes, the header alone "
            f"needs {_FIXED.size})"
        )
    (magic, version, _flags, nbuf, total, inband_off, inband_len, crc, _res) = (
        _FIXED.unpack_from(head, 0)
    )
    if magic != MAGIC:
        raise CorruptObjectError(
            f"{where}: not a meshray object file (magic {bytes(magic)!r}, "
            f"expected {MAGIC!r})"
        )
    if version != FORMAT_VERSION:
        raise CorruptObjectError(
            f"{where}: object format version {version} is not supported "
            f"(this build reads version {FORMAT_VERSION})"
        )
    table_end = _FIXED.size + _ENTRY.size * nbuf
    if table_end > file_size or table_end > len(head):
        raise CorruptObjectError(
            f"{where}: truncated object file ({file_size} bytes, header and table "
            f"of {nbuf} buffers need {table_end})"
        )
    fixed = bytearray(head[: _FIXED.size])
    fixed[_CRC_OFFSET : _CRC_OFFSET + 4] = b"\0\0\0\0"
    actual_crc = zlib.crc32(head[_FIXED.size : table_end], zlib.crc32(fixed))
    if actual_crc != crc:
        raise CorruptObjectError(
            f"{where}: corrupt object header (CRC {actual_crc:#010x}, "
            f"recorded {crc:#010x})"
        )
    if total != file_size:
        raise CorruptObjectError(
            f"{where}: truncated or padded object file (header says {total} "
            f"bytes, file has {file_size})"
        )
    offsets = []
    lens = []
    end = inband_off + inband_len
    if inband_off < table_end or end > total:
        raise CorruptObjectError(f"{where}: in-band region lies outside the file")
    for i in range(nbuf):
        off, n = _ENTRY.unpack_from(head, _FIXED.size + _ENTRY.size * i)
        if off < end or off + n > total:
            raise CorruptObjectError(
                f"{where}: buffer {i} ({n} bytes at offset {off}) overlaps another "
                f"region or lies outside the {total}-byte file"
            )
        offsets.append(off)
        lens.append(n)
        end = off + n
    return ObjectLayout(
        header_len=_align(table_end),
        inband_offset=inband_off,
        inband_len=inband_len,
        buffer_offsets=tuple(offsets),
        buffer_lens=tuple(lens),
        total_size=total,
    )


def unpack_object(data, where: str = "object") -> tuple:
    """Split a complete object image into zero-copy (in-band, buffers) views.

    Works on any bytes-like image (a mapped file, an inline copy received over
    the wire); the returned views share memory with ``data``.
    """
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    layout = _parse_header(view, len(view), where)
    inband = view[layout.inband_offset : layout.inband_offset + layout.inband_len]
    buffers = [
        view[o : o + n] for o, n in zip(layout.buffer_offsets, layout.buffer_lens)
    ]
    return inband, buffers


def _open_readonly(path: str) -> int:
    return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))


def _map_file(path: str) -> memoryview:
    fd = _open_readonly(path)
    try:
        size = os.fstat(fd).st_size
        if size < _FIXED.size:
            raise CorruptObjectError(
                f"{path}: truncated object file ({size} bytes, the header alone "
                f"needs {_FIXED.size})"
            )
        return _map_readonly(fd, size)
    finally:
        os.close(fd)


def read_object(path: str) -> tuple:
    """Map an object file read-only and return (in-band, buffers) views into it.

    Nothing is copied: the views alias the page cache, so arrays rebuilt from
    them by ``pickle.loads(inband, buffers=buffers)`` are read-only views of
    shared memory.  The mapping lives as long as any view (or anything built on
    one) does, and stays valid even if the file is unlinked or spilled
    meanwhile.  No file descriptor stays open.
    """
    return unpack_object(_map_file(path), where=path)


def read_object_layout(path: str) -> ObjectLayout:
    """Validate an object file's header without mapping it.

    The store calls this when sealing, so a creator that crashed mid-write or
    wrote garbage is caught before any reader maps the object.
    """
    fd = _open_readonly(path)
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, min(size, _FIXED.size), 0)
        if len(head) >= _FIXED.size:
            (nbuf,) = struct.unpack_from("<I", head, 12)
            want = min(size, _FIXED.size + _ENTRY.size * nbuf)
            if want > len(head):
                head = os.pread(fd, want, 0)
    finally:
        os.close(fd)
    return _parse_header(memoryview(head), size, path)


def copy_file_chunks(path: str, chunk_size: int = 4 << 20) -> Iterator[memoryview]:
    """Yield an object file as consecutive read-only chunks, for streaming transfers.

    The chunks are slices of one read-only mapping, so streaming an object
    costs no extra memory beyond what the consumer does with each chunk.  The
    header is validated first so a damaged object is never shipped to a peer.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    # Map and validate now, not on the first next(), so a missing or damaged
    # object fails before a transfer starts streaming.
    view = _map_file(path)
    _parse_header(view, len(view), path)
    return (view[start : start + chunk_size] for start in range(0, len(view), chunk_size))


class ChunkWriter:
    """Assemble an object file from chunks that may arrive in any order.

    The receiving side of a node-to-node transfer writes each chunk straight
    to its place in the file, so an object is never held twice in memory.
    ``finish`` checks that every byte arrived and that the header is valid
    before the file becomes visible at ``path``; until then it lives under a
    temporary name, so readers never map a half-received object.  Chunks may
    be written from several threads, and re-sending a chunk is harmless.

    Like ``write_object``, a large object takes the freed file the store may
    have left at ``path + RECYCLED_SUFFIX`` (recycle.py), so the chunks land
    in resident pages instead of fresh ones the kernel must zero first. Its
    old bytes are never visible: ``finish`` refuses a file with any range not
    written by this transfer.
    """

    def __init__(self, path: str, total_size: int):
        if total_size < _FIXED.size:
            raise ValueError(
                f"an object file is at least {_FIXED.size} bytes, got total_size {total_size}"
            )
        self.path = path
        self.total_size = total_size
        self._tmp = _partial_path(path)
        self._lock = threading.Lock()
        self._starts: list = []  # disjoint, sorted [start, end) ranges received
        self._ends: list = []
        # Read-write: `fill` maps the file to receive straight into its pages.
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        if total_size >= RECYCLE_MIN_BYTES:
            try:
                os.rename(path + RECYCLED_SUFFIX, self._tmp)
                flags &= ~(os.O_CREAT | os.O_EXCL)
            except FileNotFoundError:
                pass
        self._fd = None
        try:
            self._fd = os.open(self._tmp, flags, 0o600)
        except BaseException:
            _unlink_quietly(self._tmp)
            raise
        try:
            os.ftruncate(self._fd, total_size)
        except BaseException:
            self.abort()
            raise

    def _fd_for(self, offset: int, end: int, what: str) -> int:
        """The open file, once [offset, end) is known to lie inside the object."""
        if offset < 0 or end > self.total_size:
            raise ValueError(
                f"{what} [{offset}, {end}) lies outside the {self.total_size}-byte "
                f"object {self.path}"
            )
        with self._lock:
            if self._fd is None:
                raise ValueError(f"ChunkWriter for {self.path} is already closed")
            return self._fd

    def write(self, offset: int, data) -> None:
        view = _as_bytes_view(data)
        end = offset + len(view)
        fd = self._fd_for(offset, end, "chunk")
        _pwrite_all(fd, [view], offset)
        if len(view):
            with self._lock:
                self._add_range(offset, end)

    def fill(self, offset: int, length: int, receive) -> None:
        """Let `receive(view)` fill bytes [offset, offset + length) in place.

        `view` is a writable view of the file's own (shared, prefaulted)
        pages, so a socket can ``recv_into`` it with no copy in between;
        `receive` must fill all of it or raise. Several ranges may be filled
        at once from different threads.
        """
        def into_mapping(fd: int, offset: int, length: int) -> None:
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            mapped = mmap.mmap(fd, offset + length - start, flags=flags, offset=start)
            try:
                receive(memoryview(mapped)[offset - start:])
            finally:
                try:
                    mapped.close()
                except BufferError:
                    pass    # a failed receive's traceback still holds a view: unmapped with it

        self.fill_fd(offset, length, into_mapping)

    def fill_fd(self, offset: int, length: int, receive) -> None:
        """Let `receive(fd, offset, length)` write bytes [offset, offset +
        length) into the file's descriptor itself (``os.splice`` from a
        socket, say: the bytes never enter this process); it must write all
        of them or raise. The range counts as received once it returns."""
        end = offset + length
        if length <= 0:
            raise ValueError(f"length={length}: a range to fill has at least one byte")
        fd = self._fd_for(offset, end, "range")
        receive(fd, offset, length)
        with self._lock:
            self._add_range(offset, end)

    def _add_range(self, start: int, end: int) -> None:
        i = bisect.bisect_left(self._ends, start)
        j = i
        while j < len(self._starts) and self._starts[j] <= end:
            start = min(start, self._starts[j])
            end = max(end, self._ends[j])
            j += 1
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]

    @property
    def bytes_received(self) -> int:
        with self._lock:
            return sum(e - s for s, e in zip(self._starts, self._ends))

    def missing_ranges(self) -> list:
        """Byte ranges not yet written, so a transfer can re-request just those."""
        with self._lock:
            gaps = []
            pos = 0
            for s, e in zip(self._starts, self._ends):
                if s > pos:
                    gaps.append((pos, s))
                pos = e
            if pos < self.total_size:
                gaps.append((pos, self.total_size))
            return gaps

    def finish(self) -> int:
        """Publish the file at ``path``; returns its size."""
        missing = self.missing_ranges()
        if missing:
            raise ValueError(
                f"object {self.path} is incomplete: {self.total_size - self.bytes_received} "
                f"of {self.total_size} bytes missing, first gap {missing[0]}"
            )
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is None:
            raise ValueError(f"ChunkWriter for {self.path} is already closed")
        try:
            os.close(fd)
            read_object_layout(self._tmp)
            os.rename(self._tmp, self.path)
        except BaseException:
            _unlink_quietly(self._tmp)
            raise
        return self.total_size

    def abort(self) -> None:
        """Drop the partial file; safe to call more than once."""
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
            _unlink_quietly(self._tmp)

    def __enter__(self) -> "ChunkWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Leaving the block without finish() means the transfer did not
        # complete; never leave a partial file behind.
        self.abort()

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            self.abort()


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
