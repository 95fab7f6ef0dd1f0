"""The node's object store directory: made at start, swept when its daemon died.

Each daemon writes its pid into its store directory; a directory whose pid is
gone (or now belongs to a process that is not a meshray daemon) was left by a
daemon that died without cleaning up (SIGKILL, crash), and the next daemon to
start on the machine removes it.

The sweep runs once per process, not once per node: a process of hollow
nodes (meshray/scale/) starts hundreds of daemons, and sweeping at each start
listed every store dir and read its owner's command line each time --
quadratic in the nodes on the machine. What one sweep per process misses is
a dir orphaned while this process runs; the next process to start sweeps
it, which is when a real machine (one daemon per process) sweeps too.
"""
from __future__ import annotations

import os
import shutil

from meshray.object_store.store import ObjectStore

__all__ = ["OWNER_FILE", "open_node_store", "sweep_stale_stores"]

SHM_ROOT = "/dev/shm"

OWNER_FILE = ".owner-pid"
# Processes that run node daemons (a hollow-node host runs many: meshray/scale/).
DAEMON_MODULES = ("meshray.node.main", "meshray.scale.host")
_swept_roots: set[str] = set()     # roots this process has swept already


def sweep_stale_stores(root: str) -> None:
    """Remove the store dirs under `root` whose daemon is gone (module docstring).

    One pass over the dirs; each owner pid is looked up once (a host of
    hollow nodes owns many dirs under one pid)."""
    import psutil
    try:
        names = os.listdir(root)
    except OSError:
        return
    verdicts: dict[int, bool] = {}
    for name in names:
        if not name.startswith("meshray-"):
            continue
        path = os.path.join(root, name)
        try:
            with open(os.path.join(path, OWNER_FILE)) as handle:
                pid = int(handle.read().strip() or 0)
        except (OSError, ValueError):
            continue              # not ours, or being created right now
        alive = verdicts.get(pid)
        if alive is None:
            try:
                command = " ".join(psutil.Process(pid).cmdline())
                alive = any(module in command for module in DAEMON_MODULES)
            except (psutil.Error, OSError):
                alive = False
            verdicts[pid] = alive
        if not alive:
            shutil.rmtree(path, ignore_errors=True)


def open_node_store(node_id: bytes, session_dir: str, capacity: int) -> ObjectStore:
    """This node's store, in a fresh private directory marked with our pid."""
    root = os.path.join(SHM_ROOT, f"meshray-{node_id.hex()[:12]}")
    if SHM_ROOT not in _swept_roots:
        _swept_roots.add(SHM_ROOT)
        sweep_stale_stores(SHM_ROOT)
    store = ObjectStore(root, os.path.join(session_dir, "spill"), capacity)
    with open(os.path.join(root, OWNER_FILE), "w") as handle:
        handle.write(str(os.getpid()))
    return store
