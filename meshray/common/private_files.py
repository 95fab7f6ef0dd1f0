"""Local directories and files meshray trusts, and the checks that earn the trust.

meshray finds its own daemons through files under a shared temp directory
(the run dir, ``/tmp/meshray-run-<uid>``) and reads a node's token and TLS
settings from its session dir. Anyone on the machine can create paths under
``/tmp``, including the exact name we would use, before we do. A record
planted there could point a driver at a stranger's server (which then learns
our token from the first call and answers with pickles) or name a process
of ours for ``meshray stop`` to kill. So a path is trusted only when it is
owned by this user and nobody else can write to it -- then only this user
(or root) can have put its content there.

The checks run on the opened file descriptor (``fstat`` after ``open`` with
``O_NOFOLLOW``), and files inside a checked directory are opened relative to
that directory's descriptor. There is no moment between "checked" and "used"
in which the path could be swapped for a symlink or another file.
"""
from __future__ import annotations

import errno
import os
import stat

__all__ = [
    "UnsafePathError",
    "checked_run_dir",
    "open_private_dir",
    "ownership_problem",
    "read_private_file",
    "read_file_in_private_dir",
    "run_dir_path",
]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted where a file should be must not hang the open.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
_READ_LIMIT = 1 << 20


def _user(uid: int) -> str:
    try:
        import pwd
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        return f"uid {uid}"


class UnsafePathError(PermissionError):
    """A local path meshray would have trusted is not safe to trust.

    The message names the path, what was found (owner, mode, kind) and what
    was expected, so the operator can remove the path or fix its mode.
    """

    def __init__(self, path: str, what: str, found: str, expected: str):
        self.path, self.found = path, found
        super().__init__(errno.EPERM, f"refusing to use {what} {path!r}: {found}; expected "
                         f"{expected}. Remove it (or fix its owner/mode), or set "
                         "MESHRAY_RUN_DIR to a directory only you can write to")

    def __str__(self) -> str:
        return self.strerror


def _expected(directory: bool, uid: int) -> str:
    kind = "a directory (not a symlink)" if directory else "a regular file (not a symlink)"
    return f"{kind} owned by {_user(uid)} and not writable by group or others"


def ownership_problem(st: os.stat_result, *, uid: int, directory: bool) -> str | None:
    """Why a path with status `st` must not be trusted by `uid`, or None.

    Pure, so the rule is testable without making files owned by other users.
    """
    mode = stat.S_IMODE(st.st_mode)
    found = f"owned by {_user(st.st_uid)}, mode {mode:04o}"
    if directory and not stat.S_ISDIR(st.st_mode):
        return f"not a directory ({found})"
    if not directory and not stat.S_ISREG(st.st_mode):
        return f"not a regular file ({found})"
    if st.st_uid != uid:
        return found
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{found}: writable by group/others"
    return None


def _open_checked(path: str, flags: int, *, what: str, directory: bool,
                  dir_fd: int | None, shown: str | None = None) -> int:
    uid = os.geteuid()
    shown = shown or path
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except OSError as exc:
        # O_NOFOLLOW reports a symlink as ELOOP, or as ENOTDIR with O_DIRECTORY.
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        try:
            st = os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            raise exc from None
        if stat.S_ISLNK(st.st_mode):
            found = f"it is a symbolic link (owned by {_user(st.st_uid)})"
        else:
            found = ownership_problem(st, uid=uid, directory=directory) or "not usable"
        raise UnsafePathError(shown, what, found, _expected(directory, uid)) from None
    try:
        problem = ownership_problem(os.fstat(fd), uid=uid, directory=directory)
    except BaseException:
        os.close(fd)
        raise
    if problem is not None:
        os.close(fd)
        raise UnsafePathError(shown, what, problem, _expected(directory, uid))
    return fd


def open_private_dir(path: str, *, what: str = "directory", create: bool = False,
                     dir_fd: int | None = None, shown: str | None = None) -> int:
    """An O_DIRECTORY descriptor of `path` once it passes the ownership rule.

    With `create`, a missing directory is made first (mode 0700, whatever the
    umask); an existing one is checked, never adopted. The caller closes the
    descriptor. Raises UnsafePathError, or FileNotFoundError when it is
    missing and `create` is false.
    """
    if create:
        try:
            os.mkdir(path, 0o700, dir_fd=dir_fd)
        except FileExistsError:
            pass
    return _open_checked(path, _DIR_FLAGS, what=what, directory=True, dir_fd=dir_fd,
                         shown=shown)


def read_private_file(path: str, *, what: str = "file", dir_fd: int | None = None,
                      limit: int = _READ_LIMIT, shown: str | None = None) -> bytes:
    """The content of `path` (at most `limit` bytes) once it passes the ownership rule.

    FileNotFoundError is left to the caller (a missing file often just means
    "not written yet"); anything untrustworthy raises UnsafePathError.
    """
    fd = _open_checked(path, _FILE_FLAGS, what=what, directory=False, dir_fd=dir_fd,
                       shown=shown)
    try:
        chunks, total = [], 0
        while total < limit:
            chunk = os.read(fd, min(65536, limit - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_file_in_private_dir(directory: str, name: str, *, what: str,
                             dir_what: str = "session dir") -> bytes:
    """Read `name` inside `directory`, both checked; FileNotFoundError if either is missing."""
    if os.sep in name or name in ("", ".", ".."):
        raise ValueError(f"name={name!r} must be a plain file name inside {directory!r}")
    fd = open_private_dir(directory, what=dir_what)
    try:
        return read_private_file(name, what=what, dir_fd=fd,
                                 shown=os.path.join(directory, name))
    finally:
        os.close(fd)


def run_dir_path() -> str:
    """Where this user's meshray run dir is (``MESHRAY_RUN_DIR`` or the shared temp dir)."""
    import tempfile
    return os.environ.get("MESHRAY_RUN_DIR") or os.path.join(
        tempfile.gettempdir(), f"meshray-run-{os.getuid()}")


def checked_run_dir() -> str:
    """The run dir's path, created 0700 if missing; UnsafePathError if anyone else controls it."""
    path = run_dir_path()
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=0o700, exist_ok=True)
    os.close(open_private_dir(path, what="meshray run dir", create=True))
    return path
