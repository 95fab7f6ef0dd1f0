"""Where a worker listens for the holder of a lease on it.

Shared by the worker (which binds it before its hello) and its node (which
removes it once the worker is gone, so a node that outlives many workers
does not collect their sockets).
"""
from __future__ import annotations

import os

__all__ = ["worker_socket_path"]


def worker_socket_path(session_dir: str, worker_id: bytes) -> str:
    # Short: a unix socket's path has at most 107 bytes, and session
    # directories can be deep (a private TMPDIR).
    return os.path.join(session_dir, f"w-{worker_id.hex()[:12]}.sock")
