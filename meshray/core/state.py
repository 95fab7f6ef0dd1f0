"""Process-wide state: which core worker this process uses, and for what.

A driver and a worker both run one CoreWorker; the public API reads it from
here. The currently running task's spec is a context variable: each thread
has its own (threaded actors run several methods at once), and so does each
asyncio task (an async actor's coroutines interleave on one thread, and each
must see its own call).
"""
from __future__ import annotations

import contextvars
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
    cluster_address: str = ""           # a driver's etcd endpoints: what init(address=) takes
    actor_id: bytes = b""               # set in a worker that hosts an actor
    actor_reconstructed: bool = False   # this actor instance is a restart
    gpu_ids: list = field(default_factory=list)   # devices of the running task / actor
    actor_strategy_blob: bytes = b""    # an actor's creation strategy (its placement group)
    actor_spec: object = None           # the TaskSpec that created the actor this worker hosts
    actor_class_path: str = ""          # "module.Class" of that actor
    function_names: dict = field(default_factory=dict)  # function id -> (module, qualname)
    auto_init: object = None            # meshray.init itself (set by meshray._api)
    cancelled: set = field(default_factory=set)   # task ids cancelled in this worker (executor)
    lock: threading.RLock = field(default_factory=threading.RLock)


state = ProcessState()
_current_spec: contextvars.ContextVar = contextvars.ContextVar("meshray_current_spec",
                                                               default=None)


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
    """The TaskSpec this thread (or asyncio task) is executing, or None outside a task."""
    return _current_spec.get()


def current_placement_group():
    """The placement group the running task or actor was scheduled into, or None
    (always None in a driver). The runtime context and ``ray.util`` both ask."""
    spec = current_spec()
    blob = getattr(spec, "strategy_blob", b"") if spec is not None else b""
    if not blob:
        # An actor's method calls carry no strategy; the daemon may leave the
        # actor's creation strategy here for them.
        blob = getattr(state, "actor_strategy_blob", b"") or b""
    if not blob:
        return None
    import cloudpickle

    from meshray.scheduler.strategies import PlacementGroupSchedulingStrategy
    strategy = cloudpickle.loads(blob)
    if not isinstance(strategy, PlacementGroupSchedulingStrategy):
        return None
    group = strategy.placement_group
    if group is None or getattr(group, "is_empty", True):
        return None
    return group


def set_current_spec(spec) -> None:
    _current_spec.set(spec)
