"""`meshray.get_runtime_context()`: who and where the caller is, with Ray's names.

Values come from the process (node, worker, driver's job), the running task's
spec (task, job, name, resources, placement group; per thread and per
asyncio task, see core/state.py) and, inside an actor, the spec that created
the actor (its name, options, placement group, runtime env). Members with no
meaning here, and what they do instead, are listed in docs/compatibility.md.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import warnings

from meshray.common import id_types
from meshray.core import ray_alias
from meshray.core import state as state_mod

__all__ = ["RuntimeContext", "get_runtime_context"]

log = logging.getLogger(__name__)


def _deprecated(old: str, new: str, stacklevel: int = 3) -> None:
    warnings.warn(f"RuntimeContext.{old} is deprecated; use {new} instead",
                  DeprecationWarning, stacklevel=stacklevel)


def _strategy_of(blob: bytes):
    if not blob:
        return None
    import cloudpickle
    return cloudpickle.loads(blob)


class RuntimeContext:
    """A view of the calling process, task and actor."""

    # ------------------------------------------------------------ plumbing
    @staticmethod
    def _core(member: str):
        core = state_mod.state.core
        if core is None:
            raise AssertionError(f"RuntimeContext.{member} is not available because meshray "
                                 f"has not been initialized; call meshray.init() first")
        return core

    @staticmethod
    def _in_worker(member: str) -> bool:
        """Ray answers task and actor questions only in workers (None in a driver)."""
        if state_mod.state.mode == "worker":
            return True
        log.debug("RuntimeContext.%s is only available in a worker; this process is a %s",
                  member, state_mod.state.mode or "process that has not called init()")
        return False

    def _running_spec(self, member: str):
        """The running task's spec; None in a driver or between tasks."""
        return state_mod.current_spec() if self._in_worker(member) else None

    @staticmethod
    def _actor_spec():
        return state_mod.state.actor_spec if state_mod.state.actor_id else None

    def _actor_options(self) -> dict:
        spec = self._actor_spec()
        return json.loads(spec.actor_options or b"{}") if spec is not None else {}

    # ------------------------------------------------------------ ids
    def get_job_id(self) -> str:
        """The job's id in hex: the driver's, or that of the job whose task runs here."""
        core = self._core("get_job_id()")
        spec = state_mod.current_spec() or self._actor_spec()
        job = spec.job_id if spec is not None and spec.job_id else (
            state_mod.state.job_id or core.job_id)
        return job.hex()

    def get_node_id(self) -> str:
        return self._core("get_node_id()").node_id.hex()

    def get_worker_id(self) -> str:
        return self._core("get_worker_id()").worker_id.hex()

    def get_task_id(self) -> str | None:
        """The running task's id in hex; None in a driver or between tasks."""
        spec = self._running_spec("get_task_id()")
        return spec.task_id.hex() if spec is not None else None

    def get_actor_id(self) -> str | None:
        if not self._in_worker("get_actor_id()"):
            return None
        actor_id = state_mod.state.actor_id
        return actor_id.hex() if actor_id else None

    def get_placement_group_id(self) -> str | None:
        group = self._placement_group()
        return group.id.hex() if group is not None else None

    @staticmethod
    def _placement_group():
        return state_mod.current_placement_group()

    # ------------------------------------------------------------ names
    def get_task_name(self) -> str | None:
        """The task's name: `options(name=...)`, else its function's (or `Class.method`)."""
        spec = self._running_spec("get_task_name()")
        if spec is None:
            return None
        module, qualname = state_mod.state.function_names.get(spec.function_id, ("", ""))
        if not spec.actor_id and qualname and spec.name == f"{module}.{qualname}":
            return qualname     # the default name, without the module (as Ray)
        return spec.name

    def get_task_function_name(self) -> str | None:
        """`module.function` of the running task, or `module.Class.method` in an actor."""
        spec = self._running_spec("get_task_function_name()")
        if spec is None:
            return None
        if spec.actor_id:
            method = "__init__" if spec.actor_creation else spec.method_name
            return f"{state_mod.state.actor_class_path}.{method}"
        module, qualname = state_mod.state.function_names.get(spec.function_id, ("", ""))
        return f"{module}.{qualname}" if qualname else spec.name

    def get_actor_name(self) -> str | None:
        """The actor's name ("" for an unnamed actor); None outside an actor."""
        if not self._in_worker("get_actor_name()") or self._actor_spec() is None:
            return None
        return self._actor_options().get("name") or ""

    @property
    def namespace(self) -> str:
        return state_mod.state.namespace

    @property
    def current_actor(self):
        """A handle to the actor this code runs in."""
        spec = self._actor_spec()
        if spec is None:
            raise RuntimeError("RuntimeContext.current_actor is only available in an actor.")
        from meshray.actor import ActorHandle
        options = self._actor_options()
        return ActorHandle(state_mod.state.actor_id, options.get("class_name", ""),
                           options.get("methods", {}), int(options.get("max_task_retries", 0)),
                           int(options.get("max_pending_calls", -1)), options.get("name", ""))

    @property
    def was_current_actor_reconstructed(self) -> bool:
        """Whether this actor instance is a restart of an earlier one."""
        if not state_mod.state.actor_id:
            raise AssertionError("RuntimeContext.was_current_actor_reconstructed is only "
                                 "available in an actor, not in a driver or a task")
        return bool(state_mod.state.actor_reconstructed)

    # ------------------------------------------------------------ placement and resources
    @property
    def should_capture_child_tasks_in_placement_group(self) -> bool:
        """Whether tasks started here join this task's placement group (True in a driver, as Ray)."""
        if state_mod.state.mode != "worker":
            return True
        spec = state_mod.current_spec()
        blob = spec.strategy_blob if spec is not None and spec.strategy_blob else (
            state_mod.state.actor_strategy_blob)
        strategy = _strategy_of(blob)
        return bool(getattr(strategy, "placement_group_capture_child_tasks", False))

    def get_assigned_resources(self) -> dict:
        """What the running task holds, by resource name; an actor's methods: what the actor holds."""
        if state_mod.state.mode != "worker":
            raise AssertionError("RuntimeContext.get_assigned_resources() is only available in "
                                 f"a worker (a task or an actor); this process is a "
                                 f"{state_mod.state.mode or 'process that has not called init()'}")
        spec = state_mod.current_spec()
        actor_spec = self._actor_spec()
        if spec is not None and not (spec.actor_id and not spec.actor_creation):
            return dict(spec.resources)
        if actor_spec is not None:
            return dict(actor_spec.held_resources)
        return {}

    def get_accelerator_ids(self) -> dict:
        """Accelerator ids visible to the running task or actor, as strings, by resource name."""
        in_task = state_mod.current_spec() is not None or bool(state_mod.state.actor_id)
        gpu_ids = list(state_mod.state.gpu_ids) if in_task else []
        return {"GPU": [str(i) for i in gpu_ids]}

    def get_resource_ids(self) -> dict:
        _deprecated("get_resource_ids()", "get_accelerator_ids()")
        return self.get_accelerator_ids()

    def get_node_labels(self) -> dict:
        """The labels of the node this process runs on (`init(labels=...)`, `--labels`)."""
        core = self._core("get_node_labels()")
        node_hex = core.node_id.hex()
        for record in core.request("nodes"):
            if record.get("NodeID") == node_hex:
                return dict(record.get("Labels") or {})
        return {}

    # ------------------------------------------------------------ runtime env
    def get_runtime_env_string(self) -> str:
        """The runtime env in effect here, as JSON ("{}" when there is none)."""
        if state_mod.state.mode == "worker":
            from meshray.core.runtime_envs import current_runtime_env_json
            env = json.loads(current_runtime_env_json() or "{}")
        else:
            env = dict(state_mod.state.job_runtime_env or {})
        env.pop("_packages", None)   # where package bytes live: not part of the env
        env_vars = env.get("env_vars")
        if isinstance(env_vars, dict) and ray_alias.ENV_VAR in env_vars:
            # `meshray run`'s own marker for the job's workers, not the user's.
            env_vars = {k: v for k, v in env_vars.items() if k != ray_alias.ENV_VAR}
            if env_vars:
                env["env_vars"] = env_vars
            else:
                del env["env_vars"]
        return json.dumps(env, sort_keys=True)

    @property
    def runtime_env(self) -> dict:
        return json.loads(self.get_runtime_env_string())

    # ------------------------------------------------------------ cluster
    @property
    def gcs_address(self) -> str:
        """What `init(address=...)` takes to join this cluster: its etcd endpoints.

        meshray has no GCS; etcd plays its part. Only a driver knows the
        endpoints (a worker is told only its node's address)."""
        self._core("gcs_address")
        address = state_mod.state.cluster_address
        if not address:
            raise RuntimeError("RuntimeContext.gcs_address: meshray has no GCS, and this "
                               "process does not know the cluster's etcd endpoints (only a "
                               "driver does); read them in the driver and pass them on")
        return address

    def get_session_name(self) -> str:
        """The name of this node's session directory."""
        return os.path.basename(self._core("get_session_name()").session_dir.rstrip("/"))

    def get_temp_dir(self) -> str:
        """This node's session directory (meshray's temp dir for the node)."""
        return self._core("get_temp_dir()").session_dir

    def is_canceled(self) -> bool:
        """Whether the running task (or actor call) has been cancelled.

        As in Ray, a RuntimeError in a driver and in an async actor (whose
        calls are cancelled by cancelling their coroutine instead).
        """
        if state_mod.state.mode != "worker":
            raise RuntimeError("RuntimeContext.is_canceled() is only available in a task or "
                               f"a sync actor; this process is a "
                               f"{state_mod.state.mode or 'non-meshray process'}")
        if state_mod.state.actor_id and self._actor_options().get("is_async"):
            raise RuntimeError("RuntimeContext.is_canceled() is not available in an async "
                               "actor: a cancelled call's coroutine gets "
                               "asyncio.CancelledError instead")
        spec = state_mod.current_spec()
        return spec is not None and spec.task_id in state_mod.state.cancelled

    def get_dashboard_url(self) -> str:
        """``host:port`` of the dashboard on this process's node (as Ray: no scheme)."""
        return dashboard_url_of(self._core("get_dashboard_url()"))

    # ------------------------------------------------------------ deprecated
    def _legacy_id(self, member: str, cls, getter, *, worker_only: bool = False):
        """A deprecated `*_id` property: Ray's id object for what `get_<member>()` says."""
        _deprecated(member, f"get_{member}()", stacklevel=4)
        if worker_only:
            self._require_worker(member)
        value = getter()
        return cls.from_hex(value) if value else None

    @property
    def job_id(self) -> id_types.JobID:
        return self._legacy_id("job_id", id_types.JobID, self.get_job_id)

    @property
    def node_id(self) -> id_types.NodeID:
        return self._legacy_id("node_id", id_types.NodeID, self.get_node_id)

    @property
    def task_id(self) -> id_types.TaskID | None:
        return self._legacy_id("task_id", id_types.TaskID, self.get_task_id, worker_only=True)

    @property
    def actor_id(self) -> id_types.ActorID | None:
        return self._legacy_id("actor_id", id_types.ActorID, self.get_actor_id,
                               worker_only=True)

    @property
    def current_placement_group_id(self):
        _deprecated("current_placement_group_id", "get_placement_group_id()")
        group = self._placement_group()
        return group.id if group is not None else id_types.PlacementGroupID.nil()

    @staticmethod
    def _require_worker(member: str) -> None:
        if state_mod.state.mode != "worker":
            raise AssertionError(f"RuntimeContext.{member} is only available in a worker; "
                                 f"this process is a {state_mod.state.mode or 'non-meshray process'}")

    def get(self) -> dict:
        """The context as a dict of id objects (deprecated in Ray; use the get_*_id() methods)."""
        _deprecated("get()", "the get_*_id() methods")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            context = {"job_id": self.job_id, "node_id": self.node_id,
                       "namespace": self.namespace}
            if state_mod.state.mode == "worker":
                if self.task_id is not None:
                    context["task_id"] = self.task_id
                if self.actor_id is not None:
                    context["actor_id"] = self.actor_id
        return context


_context: RuntimeContext | None = None
_context_lock = threading.Lock()


def get_runtime_context() -> RuntimeContext:
    """This process's RuntimeContext (one object; its answers depend on the caller)."""
    global _context
    with _context_lock:
        if _context is None:
            _context = RuntimeContext()
        return _context


def dashboard_url_of(core) -> str:
    """``host:port`` of the dashboard of the node `core` is connected to.

    Every node serves one (on its --dashboard-port); the node's etcd record
    says where. Asked once per connection: a node's port does not change.
    "" when the record does not show it (yet).
    """
    cached = getattr(core, "_dashboard_url", None)
    if cached:
        return cached
    url = ""
    for node in core.request("nodes"):
        if node.get("NodeID") == core.node_id.hex() and node.get("DashboardPort"):
            address = str(node.get("Address") or node.get("NodeManagerAddress") or "")
            host = address.rsplit(":", 1)[0] if ":" in address else address
            url = f"{host}:{node['DashboardPort']}"
    if url:
        core._dashboard_url = url
    return url
