"""Runtime environments: what a task's worker process needs around it.

This package validates a `runtime_env` dict with Ray's field names. The
fields that change how a worker is started are applied by the node daemon,
which pools workers per environment.
"""
from __future__ import annotations

__all__ = ["validate_runtime_env", "SUPPORTED_FIELDS", "RAY_FIELDS"]

SUPPORTED_FIELDS = {"env_vars", "config"}
# Ray's fields that meshray knows by name; anything else is a typo.
RAY_FIELDS = SUPPORTED_FIELDS | {
    "working_dir", "py_modules", "pip", "uv", "conda", "container", "image_uri",
    "excludes", "nsight", "py_executable", "java_jars", "_inherit",
}


def validate_runtime_env(runtime_env: dict | None) -> dict | None:
    """Check a runtime_env and return a normalised copy (or None)."""
    if runtime_env is None:
        return None
    if not isinstance(runtime_env, dict):
        raise TypeError(f"runtime_env must be a dict, got {type(runtime_env).__name__}")
    unknown = set(runtime_env) - RAY_FIELDS
    if unknown:
        raise ValueError(f"runtime_env has unknown field(s) {sorted(unknown)}; "
                         f"known fields are {sorted(RAY_FIELDS)}")
    unsupported = set(runtime_env) - SUPPORTED_FIELDS
    if unsupported:
        raise ValueError(f"runtime_env field(s) {sorted(unsupported)} are not supported by "
                         f"this meshray version (supported: {sorted(SUPPORTED_FIELDS)})")
    env_vars = runtime_env.get("env_vars")
    if env_vars is not None:
        if not isinstance(env_vars, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()):
            raise TypeError(f"runtime_env['env_vars'] must be a dict of str to str, got {env_vars!r}")
    config = runtime_env.get("config")
    if config is not None and not isinstance(config, dict):
        raise TypeError(f"runtime_env['config'] must be a dict, got {config!r}")
    return dict(runtime_env)
