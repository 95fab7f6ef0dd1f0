"""Where a node's object files live, and how much memory they may take.

Object files hold pickled data that workers unpickle, so their directories
must be ones only this user can enter; the default capacity is a share of
memory bounded by what the shared-memory mount can hold.
"""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
from typing import Optional

__all__ = ["DEFAULT_CAPACITY_FRACTION", "default_capacity", "make_private_dir"]

DEFAULT_CAPACITY_FRACTION = 0.30


def make_private_dir(path: str) -> str:
    """Create (or re-use) a directory only this user can enter.

    Object files hold pickled data that workers unpickle, so another local
    user must not be able to plant or read them; an existing path is accepted
    only if it is a real directory we own.
    """
    path = os.path.abspath(path)
    try:
        os.makedirs(path, mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a directory")
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        raise PermissionError(
            f"{path} is owned by uid {st.st_uid}, not by this user ({os.geteuid()})"
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def _shm_root() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def default_capacity(shm_root: Optional[str] = None) -> int:
    """30 % of physical RAM, but never more than the shared-memory mount can hold.

    tmpfs pages count as memory; the cap leaves the rest for the processes
    that compute on the objects, and the mount's free space bounds what we
    could write before ENOSPC anyway.
    """
    import psutil  # deferred: workers import this package but never call this

    capacity = int(psutil.virtual_memory().total * DEFAULT_CAPACITY_FRACTION)
    try:
        capacity = min(capacity, shutil.disk_usage(shm_root or _shm_root()).free)
    except OSError:
        pass
    return capacity
