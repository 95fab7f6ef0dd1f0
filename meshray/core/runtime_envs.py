"""Driver/worker side of runtime environments: merge, upload, attach to specs.

Local directories and wheels named by `working_dir` / `py_modules` / `pip`
are zipped once per process and content-addressed; their bytes go into the
object store (kept alive for the life of this process), and the spec carries
only package URIs plus a small map from URI to object id, so nodes fetch each
package through the object store -- never through etcd.
"""
from __future__ import annotations

import base64
import importlib
import json
import pickle
import threading
import traceback

from meshray.core import state as state_mod

__all__ = ["effective_runtime_env", "attach_runtime_env", "current_runtime_env_json",
           "run_setup_hook"]

_lock = threading.Lock()
_uploads: dict[str, tuple[dict, dict]] = {}   # validated env json -> (uploaded env, uri->oid)
_package_refs: dict[str, object] = {}          # uri -> ObjectRef keeping the bytes alive


def _upload(env: dict | None, core) -> dict | None:
    """The env with local paths replaced by package URIs (uploading new packages)."""
    from meshray.runtime_env import upload_plan
    if not env:
        return None
    key = json.dumps(env, sort_keys=True, default=str)
    with _lock:
        cached = _uploads.get(key)
    if cached is not None:
        uploaded, packages = cached
    else:
        uploaded, plan = upload_plan(env)
        packages = {}
        for package in plan:
            with _lock:
                ref = _package_refs.get(package.uri)
            if ref is None:
                ref = core.put(package.data)
                with _lock:
                    _package_refs[package.uri] = ref
            packages[package.uri] = ref.hex()
        with _lock:
            _uploads[key] = (uploaded, packages)
    uploaded = dict(uploaded or {})
    if packages:
        uploaded["_packages"] = dict(packages)
    return uploaded


def current_runtime_env_json() -> str:
    """The env the running task carries; an actor's method calls carry none: its creation's."""
    parent = state_mod.current_spec()
    env = parent.runtime_env_json if parent is not None else ""
    actor_spec = state_mod.state.actor_spec
    if not env and actor_spec is not None:
        env = actor_spec.runtime_env_json
    return env


def effective_runtime_env(options_env: dict | None, core) -> dict:
    """Parent (or job) env merged with this call's env: env_vars by key, the rest replaced."""
    from meshray.runtime_env import merge_runtime_envs, validate_runtime_env
    inherited = current_runtime_env_json()
    if inherited:
        base = json.loads(inherited)
    else:
        base = _upload(state_mod.state.job_runtime_env or None, core) or {}
    if not options_env:
        return base
    child = _upload(validate_runtime_env(options_env), core) or {}
    packages = {**base.pop("_packages", {}), **child.pop("_packages", {})}
    merged = merge_runtime_envs(base, child) or {}
    if packages:
        merged["_packages"] = packages
    return merged


def attach_runtime_env(spec, options_env: dict | None, core) -> None:
    """Write the effective runtime env (and its env_vars) into a TaskSpec."""
    env = effective_runtime_env(options_env, core)
    if not env:
        return
    env_vars = env.get("env_vars") or {}
    spec.env_vars.update({str(k): str(v) for k, v in env_vars.items()})
    if set(env) - {"env_vars", "config"} or env_vars:
        spec.runtime_env_json = json.dumps(env, sort_keys=True)


def run_setup_hook(hook: str) -> None:
    """Run a validated `worker_process_setup_hook` (a pickled callable or a
    "module.function" name) in this worker; raise RuntimeEnvSetupError if it
    cannot be loaded or raises, with its traceback."""
    from meshray.exceptions import RuntimeEnvSetupError
    from meshray.runtime_env.validation import HOOK_PICKLE_PREFIX
    try:
        if hook.startswith(HOOK_PICKLE_PREFIX):
            function = pickle.loads(base64.b64decode(hook[len(HOOK_PICKLE_PREFIX):]))
        else:
            module_name, _, attribute = hook.rpartition(".")
            function = getattr(importlib.import_module(module_name), attribute)
        function()
    except Exception as exc:  # noqa: BLE001 - any failure of the hook fails the worker's tasks
        what = hook if not hook.startswith(HOOK_PICKLE_PREFIX) else "(a callable)"
        raise RuntimeEnvSetupError(
            f"Failed to execute the setup hook method runtime_env['worker_process_setup_hook']"
            f"={what} in worker pid {_pid()}: {type(exc).__name__}: {exc}\n"
            f"{traceback.format_exc()}") from None


def _pid() -> int:
    import os
    return os.getpid()
