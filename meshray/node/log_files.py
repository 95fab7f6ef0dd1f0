"""A node's log files: worker output written to disk, rotated, and read back safely.

Every worker's stdout and stderr go to ``<session>/logs/worker-<worker id>-
<job id>-<pid>.out`` / ``.err`` (Ray's names; the job part is Ray's nil job
``ffffffff`` because a meshray worker is pooled across jobs, and the file
says which job and task printed each section, see ``section_header``). The
directory is 0700 and the files 0600: task output can hold anything.

Writing: the daemon's event loop only appends to in-memory buffers
(``LogWriter.append``); a single writer thread moves them to disk every
``FLUSH_INTERVAL_S`` (sooner once a buffer holds ``FLUSH_SOON_BYTES``), and
when the daemon stops. So a slow disk delays the files, never the loop or a
task. If the disk falls so far behind that ``MAX_PENDING_BYTES`` wait in
memory, further output is dropped and the file says how many bytes were
dropped, rather than memory growing without bound.

Rotation (Python's RotatingFileHandler rules, as Ray uses them): when a write
would take a file past ``max_bytes`` it is renamed ``<name>.1`` (``.1`` to
``.2`` ...), keeping at most ``backup_count`` backups; 0 for either turns
rotation off. Settings: ``MESHRAY_LOG_ROTATION_MAX_BYTES`` /
``MESHRAY_LOG_ROTATION_BACKUP_COUNT``, else Ray's ``RAY_ROTATION_MAX_BYTES``
/ ``RAY_ROTATION_BACKUP_COUNT``; defaults 512 MiB and 5 as in Ray.

Reading: names come from requests, so they are checked (``check_filename``:
one plain file name, no separators, no ``..``) and opened relative to the
logs directory's descriptor with ``O_NOFOLLOW``; only regular files are read.
"""
from __future__ import annotations

import asyncio
import fnmatch
import os
import re
import stat
from concurrent.futures import ThreadPoolExecutor

from meshray.common.private_files import open_private_dir

__all__ = ["LOGS_DIR", "NIL_JOB_HEX", "LogWriter", "RotatingFile", "check_filename",
           "list_files", "log_group", "read_log", "rotation_settings", "section_header",
           "worker_log_name"]

LOGS_DIR = "logs"
NIL_JOB_HEX = "ffffffff"
DEFAULT_MAX_BYTES = 512 << 20
DEFAULT_BACKUP_COUNT = 5
FLUSH_INTERVAL_S = 0.1
FLUSH_SOON_BYTES = 256 << 10
MAX_PENDING_BYTES = 64 << 20
MAX_READ_BYTES = 1 << 20          # the most one get_log reply carries
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


def _setting(environ, names: tuple, default: int) -> int:
    for name in names:
        raw = environ.get(name)
        if raw is None or raw == "":
            continue
        try:
            value = int(raw)
        except ValueError:
            value = -1
        if value < 0:
            raise ValueError(f"{name}={raw!r}: expected a whole number >= 0")
        return value
    return default


def rotation_settings(environ=None) -> tuple[int, int]:
    """(max bytes per file, backups kept) from the environment (see the module docstring)."""
    environ = os.environ if environ is None else environ
    return (_setting(environ, ("MESHRAY_LOG_ROTATION_MAX_BYTES", "RAY_ROTATION_MAX_BYTES"),
                     DEFAULT_MAX_BYTES),
            _setting(environ, ("MESHRAY_LOG_ROTATION_BACKUP_COUNT", "RAY_ROTATION_BACKUP_COUNT"),
                     DEFAULT_BACKUP_COUNT))


def worker_log_name(worker_hex: str, pid: int, suffix: str, job_hex: str = NIL_JOB_HEX) -> str:
    return f"worker-{worker_hex}-{job_hex}-{pid}.{suffix}"


def section_header(job_hex: str, task_name: str) -> bytes:
    """The lines a worker's file gets where output of another job or task starts (Ray's markers)."""
    return f":job_id:{job_hex}\n:task_name:{task_name}\n".encode()


def check_filename(name) -> str:
    """`name` if it is one plain log file name; ValueError otherwise (requests are untrusted)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"filename={name!r}: expected a log file name from list_logs "
                         "(letters, digits, '_', '-', '.'; no path separators, no '..')")
    return name


def log_group(name: str) -> str:
    """The list_logs group of a file name (Ray groups by component)."""
    base = re.sub(r"\.\d+$", "", name)       # a rotated backup belongs with its file
    if base.startswith("worker-"):
        return "worker_err" if base.endswith(".err") else "worker_out"
    if base.startswith("runtime_env"):
        return "runtime_env"
    if base.startswith("node."):
        return "node"
    return "internal"


# ------------------------------------------------------------------ writing
class RotatingFile:
    """One log file and its backups; used by the writer thread only."""

    def __init__(self, dir_fd: int, name: str, max_bytes: int, backup_count: int):
        self.dir_fd, self.name = dir_fd, name
        self.max_bytes, self.backup_count = max_bytes, backup_count
        self.fd = -1
        self.size = 0
        self._open()

    def _open(self) -> None:
        self.fd = os.open(self.name, _WRITE_FLAGS, 0o600, dir_fd=self.dir_fd)
        self.size = os.fstat(self.fd).st_size

    @property
    def rotates(self) -> bool:
        return self.max_bytes > 0 and self.backup_count > 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            room = self.max_bytes - self.size if self.rotates else len(view)
            if room <= 0:
                self._rotate()
                continue
            piece = view[:room]
            if len(piece) < len(view):
                cut = bytes(piece).rfind(b"\n")
                if cut >= 0:
                    piece = piece[:cut + 1]        # keep lines whole where one fits
                elif self.size > 0:
                    self._rotate()                 # a long line starts a fresh file
                    continue
            written = os.write(self.fd, piece)
            self.size += written
            view = view[written:]

    def _rotate(self) -> None:
        """Shift the backups and start a fresh file, the name never missing.

        A reader may open ``self.name`` at any moment (``get_log`` by pid or
        task), so the current file is linked as ``.1`` and the fresh file is
        renamed over the name: each step is one atomic directory change, and
        between them the name still holds the old file. (Renaming the name
        away first, as RotatingFileHandler does, leaves a window in which a
        reader finds no such file.)
        """
        os.close(self.fd)
        dirs = {"src_dir_fd": self.dir_fd, "dst_dir_fd": self.dir_fd}
        for index in range(self.backup_count - 1, 0, -1):
            try:
                os.rename(f"{self.name}.{index}", f"{self.name}.{index + 1}", **dirs)
            except FileNotFoundError:
                pass
        try:
            os.unlink(f"{self.name}.1", dir_fd=self.dir_fd)   # the oldest, when only one is kept
        except FileNotFoundError:
            pass
        os.link(self.name, f"{self.name}.1", follow_symlinks=False, **dirs)
        fresh = f".{self.name}.new"                  # a dot name: never listed nor readable
        fd = os.open(fresh, _WRITE_FLAGS | os.O_TRUNC, 0o600, dir_fd=self.dir_fd)
        os.rename(fresh, self.name, **dirs)
        self.fd, self.size = fd, 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class LogWriter:
    """Buffered, rotating writes of a node's log files (see the module docstring)."""

    def __init__(self, logs_dir: str, *, max_bytes: int | None = None,
                 backup_count: int | None = None):
        default_max, default_count = rotation_settings()
        self.max_bytes = default_max if max_bytes is None else max_bytes
        self.backup_count = default_count if backup_count is None else backup_count
        self.logs_dir = logs_dir
        self.dir_fd = open_private_dir(logs_dir, what="logs dir", create=True)
        self._pending: dict[str, bytearray] = {}
        self._to_close: set[str] = set()
        self._dropped: dict[str, int] = {}
        self.pending_bytes = 0
        self.dropped_bytes = 0
        self._files: dict[str, RotatingFile] = {}      # writer thread only
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="meshray-logs")
        self._soon: asyncio.Event | None = None
        self._closed = False

    # -------------------------------------------------- on the event loop
    def append(self, name: str, data: bytes) -> None:
        """Queue `data` for file `name` (created at the next flush, even when empty)."""
        if self._closed:
            return
        buffer = self._pending.get(name)
        if buffer is None:
            buffer = self._pending[name] = bytearray()
        if self.pending_bytes + len(data) > MAX_PENDING_BYTES:
            self._dropped[name] = self._dropped.get(name, 0) + len(data)
            self.dropped_bytes += len(data)
            return
        buffer += data
        self.pending_bytes += len(data)
        if len(buffer) >= FLUSH_SOON_BYTES and self._soon is not None:
            self._soon.set()

    def finish(self, name: str) -> None:
        """`name` gets no more output: close it once what is queued is written (the file stays)."""
        self._to_close.add(name)

    async def run(self, stopping: asyncio.Event) -> None:
        """Flush every FLUSH_INTERVAL_S (or sooner when a buffer fills) until `stopping`."""
        self._soon = asyncio.Event()
        loop = asyncio.get_running_loop()
        while not stopping.is_set() and not self._closed:
            try:
                await asyncio.wait_for(self._soon.wait(), FLUSH_INTERVAL_S)
            except asyncio.TimeoutError:
                pass
            self._soon.clear()
            batch = self._take()
            if batch[0] or batch[2]:
                await loop.run_in_executor(self._executor, self._write, *batch)

    async def aclose(self) -> None:
        """Write everything still queued and close the files (the daemon is stopping)."""
        if self._closed:
            return
        batch = self._take()
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(self._executor, self._write_all, batch)
        self._executor.shutdown(wait=True)
        os.close(self.dir_fd)

    def _take(self):
        pending, self._pending = self._pending, {}
        dropped, self._dropped = self._dropped, {}
        closing, self._to_close = self._to_close, set()
        self.pending_bytes = 0
        return pending, dropped, closing

    # -------------------------------------------------- on the writer thread
    def _write(self, pending: dict, dropped: dict, closing: set) -> None:
        for name, data in pending.items():
            try:
                handle = self._files.get(name)
                if handle is None:
                    handle = self._files[name] = RotatingFile(
                        self.dir_fd, name, self.max_bytes, self.backup_count)
                if name in dropped:
                    data = data + (f"[meshray: {dropped.pop(name)} bytes of output dropped: "
                                   "the disk fell behind]\n").encode()
                if data:
                    handle.write(bytes(data))
            except OSError:
                self.dropped_bytes += len(data)
        for name in closing:
            handle = self._files.pop(name, None)
            if handle is not None:
                handle.close()

    def _write_all(self, batch) -> None:
        self._write(*batch)
        for handle in self._files.values():
            handle.close()
        self._files.clear()


# ------------------------------------------------------------------ reading
def _open_regular(dir_fd: int, name: str) -> int:
    fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"filename={name!r}: not a regular file")
    return fd


def list_files(dirs: list[tuple[int, list | None]], glob: str | None) -> list[dict]:
    """Regular files of each (dir fd, allowed names or None for all) matching `glob`."""
    found = []
    for dir_fd, allowed in dirs:
        for name in sorted(os.listdir(dir_fd)):
            if allowed is not None and name not in allowed:
                continue
            if glob and not fnmatch.fnmatchcase(name, glob):
                continue
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and _NAME.fullmatch(name):
                found.append({"filename": name, "size": st.st_size, "modified": st.st_mtime,
                              "group": log_group(name)})
    return found


def _tail_start(fd: int, size: int, lines: int) -> int:
    """Offset where the last `lines` lines of the file start (all of it for -1)."""
    if lines < 0:
        return 0
    if lines == 0:
        return size
    position = size
    if size and os.pread(fd, 1, size - 1) == b"\n":
        position -= 1                    # the final newline ends the last line
    needed = lines
    while position > 0:
        step = min(64 << 10, position)
        chunk = os.pread(fd, step, position - step)
        index = len(chunk)
        while True:
            index = chunk.rfind(b"\n", 0, index)
            if index < 0:
                break
            needed -= 1
            if needed == 0:
                return position - step + index + 1
        position -= step
    return 0


def read_log(dir_fd: int, name: str, *, offset: int | None, tail: int, file_id: str | None,
             limit: int = MAX_READ_BYTES) -> dict:
    """Bytes of log file `name`: from `offset` (a follow poll) or its last `tail` lines.

    A poll whose file was rotated (a different file now has the name, or it
    shrank) starts again at the new file's beginning.
    """
    fd = _open_regular(dir_fd, name)
    try:
        st = os.fstat(fd)
        current = f"{st.st_dev}:{st.st_ino}"
        rotated = offset is not None and (file_id not in (None, current) or st.st_size < offset)
        if offset is None:
            start = _tail_start(fd, st.st_size, tail)
        else:
            start = 0 if rotated else offset
        data = os.pread(fd, max(0, min(limit, st.st_size - start)), start)
    finally:
        os.close(fd)
    return {"filename": name, "start": start, "next_offset": start + len(data),
            "size": st.st_size, "file_id": current, "rotated": rotated, "data": data}
