"""`import ray` resolving to meshray, for programs started by `meshray run`.

An import finder placed first on `sys.meta_path` of one process answers for
`ray` and `ray.<module>` with the meshray module of the same role, so an
unmodified Ray Core script runs without any file written into site-packages
and without an environment variable that other programs would also see. A
`ray` package installed next to meshray is never consulted while the finder
is in place.

The alias is the very module object (`ray is meshray`): values keep their
meshray names, so cloudpickle ships them as `meshray.*` references that any
worker resolves. Code that runs `import ray` itself in a worker (a task body,
a helper module the task imports) needs the finder there too: the driver
adds `ENV_VAR` to its job's runtime env, which reaches every worker process
of the job, and worker_main installs the finder when it sees it.

A Ray library meshray does not provide (`ray.data`, `ray.tune`, ...) is
refused with a `ModuleNotFoundError` that names it, at `import ray.data` and
at `from ray import data` alike. Ray also loads those libraries on attribute
access (`ray.data.range(3)` after a bare `import ray`); there meshray raises
`MissingRayLibraryError`, an AttributeError (so `hasattr(ray, "data")` stays
False) with the same words, with or without the alias installed.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading

__all__ = ["ENV_VAR", "MissingRayLibraryError", "RayAliasFinder", "install", "installed",
           "missing_library", "with_alias_env"]

ENV_VAR = "MESHRAY_RAY_ALIAS"

# Ray modules whose meshray counterpart lives under another name.
_RENAMED = {
    "ray.remote_function": "meshray.core.remote_function",
    "ray.cloudpickle": "cloudpickle",
}

# Top-level `ray.<name>` modules meshray mirrors under `meshray.<name>`.
_MIRRORED = frozenset({"actor", "exceptions", "runtime_context", "util", "experimental",
                       "job_submission"})

# Ray's libraries and services beyond Ray Core, named for the refusal.
_LIBRARIES = {
    "air": "Ray AIR",
    "autoscaler": "the Ray autoscaler",
    "client": "Ray Client",
    "dag": "Ray DAGs",
    "dashboard": "the Ray dashboard",
    "data": "Ray Data",
    "llm": "Ray LLM",
    "rllib": "RLlib",
    "serve": "Ray Serve",
    "train": "Ray Train",
    "tune": "Ray Tune",
    "workflow": "Ray Workflows",
}

_lock = threading.Lock()


class MissingRayLibraryError(AttributeError):
    """`ray.<library>` for a Ray library meshray does not provide.

    An AttributeError, as any missing attribute is, so `hasattr` and
    `getattr(ray, name, default)` answer as for a name that is not there.
    """


def _what_is_missing(top: str) -> str:
    what = _LIBRARIES.get(top)
    if what is None:
        return "meshray does not provide this part of Ray"
    return f"meshray does not provide {what} (ray.{top}); it runs Ray Core programs only"


def missing_library(name: str) -> MissingRayLibraryError | None:
    """The error for attribute `name` of the top-level module, or None when it is
    not one of Ray's libraries (a plain AttributeError is then right)."""
    if name not in _LIBRARIES:
        return None
    return MissingRayLibraryError(f"module 'meshray' has no attribute {name!r}: "
                                  f"{_what_is_missing(name)}", name=name)


def _refusal(ray_name: str) -> ModuleNotFoundError:
    top = ray_name.split(".")[1] if "." in ray_name else ray_name
    text = f"No module named {ray_name!r}: {_what_is_missing(top)}"
    # name= is the Ray name even when the lookup came as meshray.<library>
    # (`from ray import data`): the import system then reports this error
    # instead of a bare "cannot import name".
    return ModuleNotFoundError(text, name=ray_name)


def _target(fullname: str) -> str | None:
    """The module `fullname` (a `ray` name) stands for, or None when meshray has none."""
    if fullname == "ray":
        return "meshray"
    for ray_name, target in _RENAMED.items():
        if fullname == ray_name or fullname.startswith(ray_name + "."):
            return target + fullname[len(ray_name):]
    top = fullname.split(".")[1]
    if top not in _MIRRORED:
        return None
    target = "meshray" + fullname[len("ray"):]
    try:
        found = importlib.util.find_spec(target)
    except ModuleNotFoundError:     # a parent along the way is missing
        return None
    return target if found is not None else None


class _AliasLoader(importlib.abc.Loader):
    """Loads a `ray` name as the already-importable meshray module it stands for."""

    def __init__(self, target: str):
        self.target = target
        self._own_spec = None

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self._own_spec = getattr(module, "__spec__", None)
        return module

    def exec_module(self, module) -> None:
        # The import system stamped the alias's spec on the shared module;
        # give it back its own so meshray's modules keep their identity.
        if self._own_spec is not None:
            module.__spec__ = self._own_spec


class RayAliasFinder(importlib.abc.MetaPathFinder):
    """Answers for `ray` and `ray.*` (see the module docstring)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith("meshray."):
            top = fullname.split(".")[1]
            if top in _LIBRARIES:
                raise _refusal("ray" + fullname[len("meshray"):])
            return None
        if fullname != "ray" and not fullname.startswith("ray."):
            return None
        module_name = _target(fullname)
        if module_name is None:
            raise _refusal(fullname)
        loader = _AliasLoader(module_name)
        real = importlib.util.find_spec(module_name)
        is_package = real is not None and real.submodule_search_locations is not None
        return importlib.machinery.ModuleSpec(fullname, loader, is_package=is_package)


def installed() -> bool:
    """Is the finder active in this process?"""
    return any(isinstance(finder, RayAliasFinder) for finder in sys.meta_path)


def install() -> None:
    """Put the finder first on `sys.meta_path` (once), ahead of any installed `ray`."""
    with _lock:
        if installed():
            return
        stale = [name for name in sys.modules if name == "ray" or name.startswith("ray.")]
        for name in stale:   # a real ray imported earlier must not shadow meshray
            del sys.modules[name]
        sys.meta_path.insert(0, RayAliasFinder())


def with_alias_env(runtime_env: dict | None) -> dict:
    """`runtime_env` plus the variable that makes the job's workers install the finder."""
    env = dict(runtime_env or {})
    env["env_vars"] = {**(env.get("env_vars") or {}), ENV_VAR: "1"}
    return env
