"""`meshray.get_runtime_context()`: who and where the caller is."""
from __future__ import annotations

from meshray.core import state as state_mod

__all__ = ["RuntimeContext", "get_runtime_context"]


class RuntimeContext:
    """A view of the calling process and task, with Ray's accessor names."""

    def _core(self):
        core = state_mod.state.core
        if core is None:
            raise RuntimeError("meshray is not initialized; call meshray.init() first")
        return core

    def get_job_id(self) -> str:
        spec = state_mod.current_spec()
        if spec is not None:
            return spec.job_id.hex()
        return state_mod.state.job_id.hex()

    def get_task_id(self) -> str | None:
        spec = state_mod.current_spec()
        return spec.task_id.hex() if spec is not None else None

    def get_node_id(self) -> str:
        return self._core().node_id.hex()

    def get_worker_id(self) -> str:
        return self._core().worker_id.hex()

    def get_actor_id(self) -> str | None:
        actor_id = state_mod.state.actor_id
        return actor_id.hex() if actor_id else None

    @property
    def was_current_actor_reconstructed(self) -> bool:
        return bool(state_mod.state.actor_reconstructed)

    @property
    def namespace(self) -> str:
        return state_mod.state.namespace

    def get_assigned_resources(self) -> dict:
        spec = state_mod.current_spec()
        return dict(spec.resources) if spec is not None else {}

    def get_accelerator_ids(self) -> dict:
        in_task = state_mod.current_spec() is not None or bool(state_mod.state.actor_id)
        gpu_ids = list(state_mod.state.gpu_ids) if in_task else []
        return {"GPU": [str(i) for i in gpu_ids]}

    def get(self) -> dict:
        return {"job_id": self.get_job_id(), "task_id": self.get_task_id(),
                "node_id": self.get_node_id(), "namespace": self.namespace}


def get_runtime_context() -> RuntimeContext:
    return RuntimeContext()
