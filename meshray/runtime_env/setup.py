"""Node side: from an uploaded runtime_env to the command that starts a worker.

Two steps, split so the daemon can keep its event loop free and its worker
pool pure:

1. `setup_runtime_env` (blocking, I/O): makes every package of the env
   present in the node cache, builds the pip venv, pins all of them for the
   worker about to start, and reports progress through `log`. Every failure,
   the timeout included, is a RuntimeEnvSetupError.
2. `launch_spec` (pure): turns that result into the interpreter, current
   directory and environment variables of the worker process.

`runtime_env_key` names an env before any of that happens, so tasks can be
queued and workers pooled per environment from the moment a task arrives.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

from meshray.exceptions import RuntimeEnvSetupError
from meshray.runtime_env.cache import RuntimeEnvCache
from meshray.runtime_env.pip_env import Deadline, LogFn, _safe_log
from meshray.runtime_env.validation import is_package_uri, runtime_env_config, validate_runtime_env

__all__ = [
    "ResolvedRuntimeEnv", "WorkerLaunchSpec", "runtime_env_key", "setup_runtime_env",
    "launch_spec", "DEFAULT_ENV_KEY",
]

DEFAULT_ENV_KEY = "default"      # the daemon's key for workers with no runtime_env
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def runtime_env_key(runtime_env: Optional[dict]) -> str:
    """A stable name for an (uploaded) env: equal envs share one worker pool.

    `config` is left out, as in Ray: a different timeout does not make a
    different environment. Pip requirement order does not matter either.
    """
    env = {k: v for k, v in (runtime_env or {}).items() if k != "config" and v is not None}
    if not env:
        return DEFAULT_ENV_KEY
    if isinstance(env.get("pip"), dict):
        env["pip"] = {**env["pip"], "packages": sorted(env["pip"].get("packages") or [])}
    blob = json.dumps(env, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class ResolvedRuntimeEnv:
    """An env made real on this node; `cache_keys` are pinned until released."""
    env_key: str
    working_dir: Optional[str] = None
    py_module_paths: tuple[str, ...] = ()
    python: Optional[str] = None
    env_vars: Mapping[str, str] = field(default_factory=dict)
    cache_keys: tuple[str, ...] = ()

    def release(self, cache: RuntimeEnvCache) -> None:
        """Unpin everything this setup pinned (call once, when its worker has exited)."""
        for key in self.cache_keys:
            cache.release(key)


@dataclass(frozen=True)
class WorkerLaunchSpec:
    """How to start one worker process for an environment.

    `env` is an overlay on the daemon's own environment (the daemon adds its
    connection variables on top); `cwd` None means the daemon's default.
    """
    python: str
    cwd: Optional[str]
    env: Mapping[str, str]
    env_key: str

    def argv(self, module: str = "meshray.core.worker_main") -> list[str]:
        return [self.python, "-m", module]


def _expand(value: str, environ: Optional[Mapping[str, str]]) -> str:
    """Ray's `${VAR}` references in env_vars, resolved against the daemon's environment."""
    if environ is None:
        return value
    return _VAR_RE.sub(lambda m: environ.get(m.group(1), ""), value)


def launch_spec(resolved: Optional[ResolvedRuntimeEnv], base_python: str, *,
                base_environ: Optional[Mapping[str, str]] = None) -> WorkerLaunchSpec:
    """The worker command line and environment for a resolved env. Pure.

    `base_environ` is the environment the worker would otherwise inherit
    (the daemon passes os.environ): it resolves `${VAR}` references and is
    the tail that PYTHONPATH and PATH extend, so that meshray stays importable
    and the node's tools stay reachable. The working_dir comes first on
    PYTHONPATH, then py_modules; a user-set PYTHONPATH or PATH replaces the
    inherited tail (reference `${PYTHONPATH}` in it to keep the node's).
    """
    if resolved is None:
        return WorkerLaunchSpec(base_python, None, {}, DEFAULT_ENV_KEY)
    env = {k: _expand(v, base_environ) for k, v in resolved.env_vars.items()}
    inherited = base_environ or {}
    paths = ([resolved.working_dir] if resolved.working_dir else []) + list(resolved.py_module_paths)
    user_pythonpath = env.pop("PYTHONPATH", None)
    if paths or user_pythonpath is not None:
        tail = user_pythonpath if user_pythonpath is not None else inherited.get("PYTHONPATH", "")
        env["PYTHONPATH"] = os.pathsep.join(paths + ([tail] if tail else []))
    if resolved.python:
        bin_dir = os.path.dirname(resolved.python)
        env["VIRTUAL_ENV"] = os.path.dirname(bin_dir)
        tail = env.pop("PATH", None)
        if tail is None:
            tail = inherited.get("PATH")
        if tail is not None:
            env["PATH"] = bin_dir + (os.pathsep + tail if tail else "")
    return WorkerLaunchSpec(python=resolved.python or base_python, cwd=resolved.working_dir,
                            env=env, env_key=resolved.env_key)


def setup_runtime_env(runtime_env: Optional[dict], cache: RuntimeEnvCache,
                      fetch: Callable[[str], bytes], *, log: Optional[LogFn] = None,
                      base_python: str = sys.executable) -> ResolvedRuntimeEnv:
    """Make an uploaded env ready on this node and pin it for one worker.

    `fetch(uri)` returns a package's bytes; it is called only for URIs this
    node's cache lacks. The whole setup shares the env's
    `config.setup_timeout_seconds`. Blocking: run it off the event loop. The
    caller releases the result (`resolved.release(cache)`) when the worker
    exits; after pinning, unpinned old entries are evicted if over the limit.
    """
    try:
        env = validate_runtime_env(runtime_env) or {}
    except (TypeError, ValueError) as exc:
        raise RuntimeEnvSetupError(f"invalid runtime_env: {exc}") from exc
    local = [p for p in [env.get("working_dir"), *(env.get("py_modules") or [])]
             if p is not None and not is_package_uri(p)]
    if local:
        raise RuntimeEnvSetupError(f"runtime_env still names local path(s) {local}; the driver "
                                   f"must ship them with upload_plan() before submitting")
    timeout = runtime_env_config(env)["setup_timeout_seconds"]
    deadline = Deadline(None if timeout == -1 else timeout)
    pinned: list[str] = []

    def ensure(uri: str) -> str:
        def fetch_logged() -> bytes:
            _safe_log(log, f"runtime_env: fetching {uri}")
            data = fetch(uri)
            if deadline.expired():
                raise deadline.error(f"fetching {uri}")
            return data
        path = cache.ensure_package(uri, fetch_logged, acquire=True)
        pinned.append(cache.key_for_uri(uri))
        return path

    try:
        working_dir = ensure(env["working_dir"]) if env.get("working_dir") else None
        modules = tuple(ensure(u) for u in env.get("py_modules") or ())
        python = None
        if env.get("pip"):
            pip = dict(env["pip"])
            pip["packages"] = [ensure(r) if is_package_uri(r) else r for r in pip["packages"]]
            python = cache.ensure_pip_env(pip, log, deadline, base_python=base_python,
                                          acquire=True)
            pinned.append(cache.key_for_pip(pip, base_python))
        if deadline.expired():
            raise deadline.error("unpacking packages")
    except BaseException as exc:
        for key in pinned:
            cache.release(key)
        if isinstance(exc, Exception) and not isinstance(exc, RuntimeEnvSetupError):
            raise RuntimeEnvSetupError(f"{type(exc).__name__}: {exc}") from exc
        raise
    try:
        cache.evict()
    except OSError as exc:
        _safe_log(log, f"runtime_env: cache eviction failed: {exc}")
    return ResolvedRuntimeEnv(env_key=runtime_env_key(env), working_dir=working_dir,
                              py_module_paths=modules, python=python,
                              env_vars=dict(env.get("env_vars") or {}),
                              cache_keys=tuple(pinned))
