"""Runtime environments on a node: made ready before their workers start.

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
import json
import logging
import os
import sys
import time
from typing import Awaitable, Callable

from meshray import exceptions
from meshray.common import ids
from meshray.rpc.generated import meshray_pb2 as pb

__all__ = ["EnvSetup", "NEEDS_SETUP", "IDLE_ENV_WORKER_TIMEOUT_S"]

log = logging.getLogger(__name__)

NEEDS_SETUP = ("working_dir", "py_modules", "pip")
IDLE_ENV_WORKER_TIMEOUT_S = 60.0


def parse_task_env(spec) -> tuple[dict, dict]:
    """(runtime env without the package map, uri -> object id hex) of a TaskSpec."""
    if not spec.runtime_env_json:
        return {}, {}
    env = json.loads(spec.runtime_env_json)
    packages = env.pop("_packages", {}) or {}
    return env, packages


class EnvSetup:
    """Sets up runtime environments and starts (and reclaims) their workers.

    It owns the environment cache and the set of setups under way, so no
    environment is set up twice at once. What it needs from the daemon is
    passed in, each for one reason:

    - `pool`: a callable returning the worker pool, which exists only once
      the daemon serves (workers need its address);
    - `object_bytes`: an awaitable reading a package object's bytes, wherever
      in the cluster it lives;
    - `uploaded_bytes`: reads a package a job client uploaded (kept in etcd;
      blocking, so called off the loop);
    - `log_writer` and `log_streams`: where setup output goes (the job's log
      file and its drivers);
    - `setup_ended(worker_key, error)`: the tasks waiting for a worker belong
      to the daemon; it fails them when `error` is set and schedules again.
    """

    def __init__(self, *, pool: Callable[[], object],
                 object_bytes: Callable[[bytes], Awaitable[bytes]],
                 uploaded_bytes: Callable[[str], bytes], log_writer, log_streams,
                 setup_ended: Callable[[str, BaseException | None], None]):
        self._pool = pool
        self._object_bytes = object_bytes
        self._uploaded_bytes = uploaded_bytes
        self._log_writer = log_writer
        self._log_streams = log_streams
        self._setup_ended = setup_ended
        self._cache = None
        self._setups: set[str] = set()

    @property
    def cache(self):
        """The node's RuntimeEnvCache, made on first use (most nodes never need one)."""
        if self._cache is None:
            from meshray.runtime_env import RuntimeEnvCache
            self._cache = RuntimeEnvCache()
        return self._cache

    def start_workers_for(self, task, count: int) -> None:
        """Start `count` workers for the task's environment, setting it up first if needed."""
        if not any(task.runtime_env.get(f) for f in NEEDS_SETUP):
            for _ in range(count):
                self._pool().start(ids.new_id(), task.worker_key, task.worker_env)
            return
        if task.worker_key in self._setups:
            return
        self._setups.add(task.worker_key)
        asyncio.get_running_loop().create_task(self._setup_then_start(task, count))

    async def _setup_then_start(self, task, count: int) -> None:
        from meshray.runtime_env import launch_spec, setup_runtime_env
        loop = asyncio.get_running_loop()
        key = task.worker_key
        job_hex = task.spec.job_id.hex()
        failure = None
        try:
            blobs = {}
            for uri, object_hex in task.packages.items():
                blobs[uri] = await self._object_bytes(bytes.fromhex(object_hex))

            def log_line(line: str) -> None:
                loop.call_soon_threadsafe(self._log, job_hex, line)

            def fetch(uri: str) -> bytes:
                # A URI the task brings no object for was uploaded by a job
                # client: it is in etcd (node/job_packages.py).
                return blobs[uri] if uri in blobs else self._uploaded_bytes(uri)

            started = time.monotonic()
            resolved_list = []
            for _ in range(max(1, count)):
                resolved_list.append(await loop.run_in_executor(
                    None, lambda: setup_runtime_env(task.runtime_env, self.cache,
                                                    fetch=fetch, log=log_line,
                                                    base_python=sys.executable)))
            log.info("runtime env %s ready in %.3fs", key, time.monotonic() - started)
            for resolved in resolved_list:
                spec = launch_spec(resolved, sys.executable, base_environ=os.environ)
                extra = {**task.worker_env, **spec.env}
                worker = self._pool().start(ids.new_id(), key, extra, python=spec.python,
                                            cwd=spec.cwd)
                worker.resolved_env = resolved
        except Exception as exc:  # noqa: BLE001 - every waiting task gets the error
            failure = exc if isinstance(exc, exceptions.RuntimeEnvSetupError) else \
                exceptions.RuntimeEnvSetupError(f"{type(exc).__name__}: {exc}")
            self._log(job_hex, f"runtime_env setup failed: {failure}")
        finally:
            self._setups.discard(key)
            self._setup_ended(key, failure)

    def _log(self, job_hex: str, line: str) -> None:
        self._log_writer.append(f"runtime_env_setup-{job_hex}.log", (line + "\n").encode())
        self._log_streams.deliver(job_hex, [pb.LogLine(prefix="(runtime_env)", text=line,
                                                       is_err=True)])

    def reclaim_idle_workers(self) -> None:
        """Workers of a runtime environment that sat idle too long are stopped."""
        pool = self._pool()
        now = time.monotonic()
        for key, workers in list(pool.idle.items()):
            if key == "default":
                continue
            for worker in list(workers):
                if now - worker.idle_since > IDLE_ENV_WORKER_TIMEOUT_S:
                    workers.remove(worker)
                    pool.kill(worker)
