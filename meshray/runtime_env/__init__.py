"""Runtime environments: what a task's or actor's worker process needs around it.

Ray's `runtime_env` fields, split by where the work happens:

* driver: `validate_runtime_env` (fail early, normalise), `merge_runtime_envs`
  (parent -> child inheritance) and `upload_plan` (local paths -> content-
  addressed package URIs plus the bytes to put in the object store);
* node: `RuntimeEnvCache` (unpacked packages and pip venvs, LRU-evicted,
  pinned while workers use them), `setup_runtime_env` (make an env real and
  pin it) and `launch_spec` (the worker's python, cwd and environment).

docs/runtime-env.md describes the whole flow.
"""
from __future__ import annotations

from meshray.runtime_env.cache import (
    CacheEntryInfo, RuntimeEnvCache, choose_evictions, default_cache_bytes, default_cache_root,
)
from meshray.runtime_env.packaging import (
    Package, PackageError, package_directory, package_file, package_wheel_or_module, parse_uri,
    unpack_package, upload_plan, uris_in,
)
from meshray.runtime_env.pip_env import Deadline
from meshray.runtime_env.setup import (
    DEFAULT_ENV_KEY, ResolvedRuntimeEnv, WorkerLaunchSpec, launch_spec, runtime_env_key,
    setup_runtime_env,
)
from meshray.runtime_env.validation import (
    CONFIG_DEFAULTS, RAY_FIELDS, SUPPORTED_FIELDS, UNSUPPORTED_FIELDS, merge_runtime_envs,
    runtime_env_config, validate_runtime_env,
)

__all__ = [
    # driver side
    "validate_runtime_env", "merge_runtime_envs", "runtime_env_config", "upload_plan",
    "package_directory", "package_wheel_or_module", "package_file", "Package", "PackageError",
    "parse_uri", "uris_in", "unpack_package",
    # node side
    "RuntimeEnvCache", "CacheEntryInfo", "choose_evictions", "default_cache_root",
    "default_cache_bytes", "setup_runtime_env", "ResolvedRuntimeEnv", "WorkerLaunchSpec",
    "launch_spec", "runtime_env_key", "Deadline", "DEFAULT_ENV_KEY",
    # field tables
    "SUPPORTED_FIELDS", "UNSUPPORTED_FIELDS", "RAY_FIELDS", "CONFIG_DEFAULTS",
]
