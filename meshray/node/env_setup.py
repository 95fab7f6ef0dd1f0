"""The node daemon's runtime-environment duties, as a mixin of NodeDaemon.

A worker for an environment with packages or pip requirements is started
only after the environment exists on this node: its packages are fetched
through the object store (never etcd) and unpacked into the node's cache,
its virtualenv is created once and reused. Setup runs off the event loop;
its progress and pip's output go to the drivers of the job and to
``logs/runtime_env_setup-<job id>.log``; a failure fails
every task waiting for that environment with RuntimeEnvSetupError.
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import pickle
import sys
import time

from meshray import exceptions
from meshray.object_store import layout
from meshray.rpc.generated import meshray_pb2 as pb

__all__ = ["EnvSetup", "NEEDS_SETUP", "IDLE_ENV_WORKER_TIMEOUT_S"]

log = logging.getLogger(__name__)

NEEDS_SETUP = ("working_dir", "py_modules", "pip")
IDLE_ENV_WORKER_TIMEOUT_S = 60.0


class _BytesOnly(pickle.Unpickler):
    """Package bytes arrive pickled; refuse anything but plain data."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"runtime_env package holds {module}.{name}, not bytes")


def parse_task_env(spec) -> tuple[dict, dict]:
    """(runtime env without the package map, uri -> object id hex) of a TaskSpec."""
    if not spec.runtime_env_json:
        return {}, {}
    env = json.loads(spec.runtime_env_json)
    packages = env.pop("_packages", {}) or {}
    return env, packages


class EnvSetup:
    """Mixed into NodeDaemon."""

    def _init_env_setup(self) -> None:
        self._env_cache = None
        self._env_setups: set[str] = set()
        self.object_waiters: dict[bytes, list] = {}

    @property
    def env_cache(self):
        if self._env_cache is None:
            from meshray.runtime_env import RuntimeEnvCache
            self._env_cache = RuntimeEnvCache()
        return self._env_cache

    def _start_workers_for(self, task, count: int) -> None:
        if not any(task.runtime_env.get(f) for f in NEEDS_SETUP):
            for _ in range(count):
                self.pool.start(self._new_worker_id(), task.worker_key, task.worker_env)
            return
        if task.worker_key in self._env_setups:
            return
        self._env_setups.add(task.worker_key)
        asyncio.get_running_loop().create_task(self._setup_env_then_start(task, count))

    async def _setup_env_then_start(self, task, count: int) -> None:
        from meshray.runtime_env import launch_spec, setup_runtime_env
        loop = asyncio.get_running_loop()
        key = task.worker_key
        job_hex = task.spec.job_id.hex()
        try:
            blobs = {}
            for uri, object_hex in task.packages.items():
                blobs[uri] = await self._object_bytes(bytes.fromhex(object_hex))

            def log_line(line: str) -> None:
                loop.call_soon_threadsafe(self._env_log, job_hex, line)

            def fetch(uri: str) -> bytes:
                # A URI the task brings no object for was uploaded by a job
                # client: it is in etcd (node/job_packages.py).
                return blobs[uri] if uri in blobs else self.jobs.package_bytes(uri)

            started = time.monotonic()
            resolved_list = []
            for _ in range(max(1, count)):
                resolved_list.append(await loop.run_in_executor(
                    None, lambda: setup_runtime_env(task.runtime_env, self.env_cache,
                                                    fetch=fetch, log=log_line,
                                                    base_python=sys.executable)))
            log.info("runtime env %s ready in %.3fs", key, time.monotonic() - started)
            for resolved in resolved_list:
                spec = launch_spec(resolved, sys.executable, base_environ=os.environ)
                extra = {**task.worker_env, **spec.env}
                worker = self.pool.start(self._new_worker_id(), key, extra, python=spec.python,
                                         cwd=spec.cwd)
                worker.resolved_env = resolved
        except Exception as exc:  # noqa: BLE001 - every waiting task gets the error
            error = exc if isinstance(exc, exceptions.RuntimeEnvSetupError) else \
                exceptions.RuntimeEnvSetupError(f"{type(exc).__name__}: {exc}")
            self._env_log(job_hex, f"runtime_env setup failed: {error}")
            for waiting in [t for t in self.awaiting_worker if t.worker_key == key]:
                self.awaiting_worker.remove(waiting)
                self._fail(waiting, error)
        finally:
            self._env_setups.discard(key)
            self._schedule()

    def _env_log(self, job_hex: str, line: str) -> None:
        self.log_writer.append(f"runtime_env_setup-{job_hex}.log", (line + "\n").encode())
        self.log_streams.deliver(job_hex, [pb.LogLine(prefix="(runtime_env)", text=line,
                                                      is_err=True)])

    async def _object_bytes(self, object_id: bytes) -> bytes:
        """The bytes held by a put(bytes) object, wherever it lives."""
        holder = "runtime_env"
        self.objects.add_holder(object_id, holder)
        try:
            value = self.objects.get(object_id)
            if value is None:
                future = asyncio.get_running_loop().create_future()
                self.object_waiters.setdefault(object_id, []).append(future)
                self._apply(self.objects.subscribe(object_id, holder))
                self._flush_borrows()
                value = self.objects.get(object_id) or await asyncio.wait_for(future, 120)
            if value.is_error:
                raise exceptions.RuntimeEnvSetupError(
                    f"the runtime_env package object {object_id.hex()} is an error value")
            if value.in_store:
                reply = await self._ask_restore(None, {"object_id": object_id.hex(),
                                                       "location": value.location})
                inband, buffers = layout.read_object(reply["path"])
                data = pickle.loads(inband, buffers=buffers) if not buffers else bytes(buffers[0])
                return bytes(data)
            return _BytesOnly(io.BytesIO(value.inline_data)).load()
        finally:
            self._apply(self.objects.remove_holder(object_id, holder))
            self._flush_borrows()

    def _wake_object_waiters(self, object_id: bytes) -> None:
        for future in self.object_waiters.pop(object_id, ()):
            if not future.done():
                future.set_result(self.objects.get(object_id))

    def _reclaim_idle_env_workers(self) -> None:
        """Workers of a runtime environment that sat idle too long are stopped."""
        now = time.monotonic()
        for key, workers in list(self.pool.idle.items()):
            if key == "default":
                continue
            for worker in list(workers):
                if now - worker.idle_since > IDLE_ENV_WORKER_TIMEOUT_S:
                    workers.remove(worker)
                    self.pool.kill(worker)
