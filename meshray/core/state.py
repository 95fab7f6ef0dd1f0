"""Process-wide state: which core worker this process uses, and for what.

A driver and a worker both run one CoreWorker; the public API reads it from
here. The currently running task's spec is thread-local so threaded actors
(several methods at once) each see their own.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

__all__ = ["ProcessState", "state", "current_spec", "set_current_spec", "ensure_core"]


@dataclass
class ProcessState:
    core: object = None                 # CoreWorker
    mode: str | None = None             # "driver" | "worker"
    job_id: bytes = b""
    namespace: str = ""
    job_runtime_env: dict = field(default_factory=dict)
    local_node: object = None           # handle on a node this driver started
    actor_id: bytes = b""               # set in a worker that hosts an actor
    actor_reconstructed: bool = False   # this actor instance is a restart
    gpu_ids: list = field(default_factory=list)   # devices of the running task / actor
    actor_strategy_blob: bytes = b""    # an actor's creation strategy (its placement group)
    auto_init: object = None            # () -> None: meshray.init() with defaults (set by meshray._api)
    lock: threading.RLock = field(default_factory=threading.RLock)


state = ProcessState()
_task_local = threading.local()


def ensure_core():
    """This process's CoreWorker, connecting first (as a bare `init()`) when there is none.

    Ray starts or joins a cluster on the first call that needs one. The
    public API registers how (`auto_init`), so that core modules that submit
    work can connect without importing the API layer above them.
    """
    core = state.core
    if core is None:
        if state.auto_init is None:
            raise RuntimeError("meshray is not initialized; call meshray.init() first")
        state.auto_init()
        core = state.core
    return core


def current_spec():
    """The TaskSpec this thread is executing, or None outside a task."""
    return getattr(_task_local, "spec", None)


def set_current_spec(spec) -> None:
    _task_local.spec = spec
