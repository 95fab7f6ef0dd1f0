"""The node store's directory of actor-call argument files, and who owns each file.

A caller (meshray.core.arg_files) writes large actor-call arguments into
files here; the node daemon (meshray.node) removes the files of a caller that
died without cleaning up. Both must agree on where the files are and how a
file's name says which process and core worker wrote it, so that agreement
lives here, below both sides.

Files are named ``<pid>-<worker id hex>-<n>``, so the node can remove a
core worker's files once that worker's connection closes (``sweep_process``).
"""
from __future__ import annotations

import os

__all__ = ["ARGS_DIR", "args_dir", "file_prefix", "check_name", "unlink", "sweep_process"]

ARGS_DIR = "args"


def args_dir(store_dir: str) -> str:
    return os.path.join(store_dir, ARGS_DIR)


def file_prefix(pid: int, owner: bytes) -> str:
    """The start of every file name written by core worker `owner` in process `pid`."""
    return f"{int(pid)}-{owner.hex()}-"


def check_name(name: str) -> None:
    """ValueError unless `name` is a plain file name inside the directory."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"invalid argument file name {name!r}")


def unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _names(store_dir: str) -> list:
    try:
        return os.listdir(args_dir(store_dir))
    except OSError:
        return []


def sweep_process(store_dir: str, pid: int, worker_id: bytes | None = None) -> int:
    """Remove the argument files of process ``pid`` (of its core ``worker_id`` if given).

    For the node daemon, when a driver's or worker's connection closes: that
    core worker owned these files and can no longer release them (a process
    that re-initialises gets a new worker id, so its new files are safe).
    Returns how many were removed.
    """
    prefix = file_prefix(pid, worker_id) if worker_id else f"{int(pid)}-"
    removed = 0
    for name in _names(store_dir):
        if name.startswith(prefix):
            unlink(os.path.join(args_dir(store_dir), name))
            removed += 1
    return removed

