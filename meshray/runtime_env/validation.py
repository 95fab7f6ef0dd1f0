"""Checking and combining `runtime_env` dicts (Ray's field names and meanings).

Validation runs in the driver, before anything is packaged or sent, so that a
typo or a missing directory fails at the call site with an error that names
the field and the value -- not minutes later on some node. The normalised
form it returns is also what every later stage accepts: local paths are
absolute, `pip` is always the dict form, and `config` carries its defaults.
Validating an already normalised (or uploaded, URI-form) env returns it
unchanged, so any process may re-validate what it receives.
"""
from __future__ import annotations

import copy
import errno
import os
import re
import types
from typing import Any, Mapping

from meshray.exceptions import RuntimeEnvSetupError

__all__ = [
    "validate_runtime_env", "merge_runtime_envs", "runtime_env_config", "parse_size",
    "max_package_bytes", "is_package_uri", "looks_like_local_path",
    "SUPPORTED_FIELDS", "UNSUPPORTED_FIELDS", "RAY_FIELDS", "CONFIG_DEFAULTS",
    "PACKAGE_URI_SCHEME", "DEFAULT_MAX_PACKAGE_BYTES", "MAX_SIZE_ENV", "HOOK_PICKLE_PREFIX",
]

PACKAGE_URI_SCHEME = "meshray-pkg://"
SUPPORTED_FIELDS = frozenset({"env_vars", "config", "working_dir", "py_modules", "pip", "excludes",
                              "worker_process_setup_hook"})
# Ray's fields that meshray recognises but cannot honour, each with the advice
# we give instead; anything outside RAY_FIELDS is treated as a typo.
_UNSUPPORTED_ADVICE = {
    "conda": "install the packages into the node image, or declare them with 'pip'",
    "uv": "declare the requirements with 'pip' (same list format)",
    "container": "run the node daemons inside the image you want (see docs/runtime-env.md)",
    "image_uri": "run the node daemons inside the image you want (see docs/runtime-env.md)",
    "py_executable": "install the interpreter's packages with 'pip', or start the node in that "
                     "interpreter",
    "java_jars": "meshray runs Python workers only",
    "nsight": "profile the worker process directly",
    "_nsight": "profile the worker process directly",
    "rocprof_sys": "profile the worker process directly",
    "_rocprof_sys": "profile the worker process directly",
    "_inherit": "children inherit their parent's runtime_env automatically",
    "_ray_release": "not meaningful outside Ray",
    "_ray_commit": "not meaningful outside Ray",
    "_inject_current_ray": "not meaningful outside Ray",
}
UNSUPPORTED_FIELDS = frozenset(_UNSUPPORTED_ADVICE)
RAY_FIELDS = SUPPORTED_FIELDS | UNSUPPORTED_FIELDS
# Fields that choose the Python environment; Ray allows only one of them.
_ENV_MANAGERS = ("pip", "uv", "conda", "container", "image_uri", "py_executable")

CONFIG_DEFAULTS = {"setup_timeout_seconds": 600, "eager_install": True}
_PIP_KEYS = {"packages", "pip_check", "pip_version"}

MAX_SIZE_ENV = "MESHRAY_RUNTIME_ENV_MAX_SIZE"
DEFAULT_MAX_PACKAGE_BYTES = 100 * 1024 * 1024
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000 ** 2, "mb": 1000 ** 2,
               "mib": 1024 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3, "gib": 1024 ** 3,
               "t": 1000 ** 4, "tb": 1000 ** 4, "tib": 1024 ** 4}
# A callable setup hook travels pickled, as this prefix and base64 text (the
# env is JSON); any other string names an importable "module.function".
HOOK_PICKLE_PREFIX = "meshray-hook-pickle:"
_HOOK_NAME_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+$")
_ARCHIVE_SUFFIXES = (".whl", ".zip", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar")
_URI_RE = re.compile(r"^meshray-pkg://[0-9a-f]{64}(\.zip|\.whl|/[^/\0]+)$")


def parse_size(text: str | int, what: str = "size") -> int:
    """Bytes from '100MiB', '2G', '1500000' -- sizes are set by people in env vars."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
        unit = m.group(2).lower() if m else None
        if not m or unit not in _SIZE_UNITS:
            raise ValueError(f"{what}={text!r} is not a size: expected bytes as an integer or with "
                             f"a unit such as 100MiB, 512MB, 2GiB")
        value = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"{what}={text!r} must be a positive size")
    return value


def max_package_bytes(environ: Mapping[str, str] | None = None) -> int:
    """The per-package size cap: big enough for code, small enough to catch a stray dataset."""
    environ = os.environ if environ is None else environ
    raw = environ.get(MAX_SIZE_ENV)
    return DEFAULT_MAX_PACKAGE_BYTES if raw in (None, "") else parse_size(raw, MAX_SIZE_ENV)


def is_package_uri(value: Any) -> bool:
    return isinstance(value, str) and bool(_URI_RE.match(value))


def looks_like_local_path(req: str) -> bool:
    """Whether a pip requirement line names a local file or directory.

    pip itself decides this by shape, so we do too: a separator or an
    archive suffix means a path; a bare name is a project on an index.
    """
    if not req or req.startswith("-") or "://" in req or " @ " in req or ";" in req:
        return False
    return ("/" in req or req.startswith(".") or req.startswith("~")
            or req.lower().endswith(_ARCHIVE_SUFFIXES))


def _abs(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _check_remote(field: str, value: str) -> None:
    if "://" in value and not value.startswith(PACKAGE_URI_SCHEME):
        raise ValueError(f"runtime_env[{field!r}]={value!r}: remote URIs are not supported by "
                         f"meshray; give a local path (the driver packages it and ships it "
                         f"through the object store)")
    if value.startswith(PACKAGE_URI_SCHEME) and not is_package_uri(value):
        raise ValueError(f"runtime_env[{field!r}]={value!r} is not a valid meshray package URI "
                         f"(expected meshray-pkg://<sha256>.zip, .whl or /<filename>)")


def _validate_working_dir(value: Any) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise TypeError(f"runtime_env['working_dir'] must be a path to a local directory "
                        f"(str or os.PathLike), got {value!r}")
    _check_remote("working_dir", value)
    if is_package_uri(value):
        if not value.endswith(".zip"):
            raise ValueError(f"runtime_env['working_dir']={value!r} must be a directory package "
                             f"URI ending in .zip")
        return value
    path = _abs(value)
    if not os.path.exists(path):
        raise ValueError(f"runtime_env['working_dir']={value!r} does not exist (resolved to {path})")
    if not os.path.isdir(path):
        raise ValueError(f"runtime_env['working_dir']={value!r} is not a directory "
                         f"(resolved to {path})")
    return path


def _module_path(module: types.ModuleType) -> str:
    """A package's directory or a single-file module's file: what gets shipped."""
    paths = list(getattr(module, "__path__", None) or ())
    if paths:
        return paths[0]
    file = getattr(module, "__file__", None)
    if not file:
        raise ValueError(f"runtime_env['py_modules'] entry {module!r} has no file on disk "
                         f"(a namespace or built-in module cannot be shipped)")
    return file


def _validate_py_modules(value: Any) -> list[str]:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"runtime_env['py_modules'] must be a list of local directories, .whl "
                        f"files or module objects, got {type(value).__name__} {value!r}")
    out = []
    for i, item in enumerate(value):
        where = f"runtime_env['py_modules'][{i}]"
        if isinstance(item, types.ModuleType):
            item = _module_path(item)
        elif isinstance(item, os.PathLike):
            item = os.fspath(item)
        if not isinstance(item, str) or not item:
            raise TypeError(f"{where} must be a path (str), a module object or a meshray package "
                            f"URI, got {item!r}")
        _check_remote("py_modules", item)
        if is_package_uri(item):
            out.append(item)
            continue
        path = _abs(item)
        if not os.path.exists(path):
            raise ValueError(f"{where}={item!r} does not exist (resolved to {path})")
        if os.path.isfile(path) and not path.endswith((".whl", ".py")):
            raise ValueError(f"{where}={item!r} is a file but not a .whl wheel or a .py module")
        out.append(path)
    return out


def _validate_excludes(value: Any) -> list[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise TypeError(f"runtime_env['excludes'] must be a list of gitignore-style patterns "
                        f"(str), got {value!r}")
    return list(value)


def _read_requirements_file(path: str, seen: tuple[str, ...] = ()) -> list[str]:
    """Lines of a requirements file, with `-r` includes inlined.

    The file is read on the driver because the nodes cannot see it; relative
    paths inside it are resolved against the file's own directory, as pip does.
    """
    path = _abs(path)
    if path in seen:
        raise ValueError(f"runtime_env['pip']: requirements file {path} includes itself")
    if not os.path.isfile(path):
        raise ValueError(f"runtime_env['pip']={path!r} is neither a list of requirements nor an "
                         f"existing requirements file")
    base = os.path.dirname(path)
    out: list[str] = []
    with open(path, encoding="utf-8") as f:
        text = f.read().replace("\\\n", "")
    for raw in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        m = re.match(r"^(-r|--requirement)(?:\s+|=)(.+)$", line)
        if m:
            inc = os.path.join(base, os.path.expanduser(m.group(2).strip()))
            out.extend(_read_requirements_file(inc, seen + (path,)))
            continue
        if looks_like_local_path(line) and not os.path.isabs(os.path.expanduser(line)):
            candidate = os.path.join(base, line)
            if os.path.exists(candidate):
                line = os.path.abspath(candidate)
        out.append(line)
    return out


def _validate_pip_packages(packages: Any) -> list[str]:
    if isinstance(packages, os.PathLike):
        packages = os.fspath(packages)
    if isinstance(packages, str):
        packages = _read_requirements_file(packages)
    if not isinstance(packages, (list, tuple)):
        raise TypeError(f"runtime_env['pip'] packages must be a list of requirement strings or "
                        f"a path to a requirements file, got {packages!r}")
    out = []
    for i, req in enumerate(packages):
        if not isinstance(req, str):
            raise TypeError(f"runtime_env['pip'] entry {i} must be a str, got {req!r}")
        req = req.strip()
        if not req:
            continue
        if is_package_uri(req):
            out.append(req)
            continue
        if looks_like_local_path(req):
            path = _abs(req)
            if os.path.exists(path):
                req = path
            elif req.lower().endswith(_ARCHIVE_SUFFIXES) or req.startswith((".", "/", "~")):
                # Ray finds this when it installs the env; it is the same failure found sooner.
                error = RuntimeEnvSetupError(
                    f"runtime_env['pip'] entry {req!r} looks like a local path but does not "
                    f"exist (resolved to {path}), so pip cannot install it")
                raise error from FileNotFoundError(errno.ENOENT, "No such file", path)
        out.append(req)
    return out


def _validate_pip(value: Any) -> dict:
    if isinstance(value, dict):
        unknown = set(value) - _PIP_KEYS
        if unknown:
            raise ValueError(f"runtime_env['pip'] has unknown key(s) {sorted(unknown)}; "
                             f"expected {sorted(_PIP_KEYS)}")
        if "packages" not in value:
            raise ValueError("runtime_env['pip'] in dict form needs a 'packages' key "
                             "(a list of requirements or a requirements file path)")
        pip_check = value.get("pip_check", False)
        if not isinstance(pip_check, bool):
            raise TypeError(f"runtime_env['pip']['pip_check'] must be a bool, got {pip_check!r}")
        out = {"packages": _validate_pip_packages(value["packages"]), "pip_check": pip_check}
        version = value.get("pip_version")
        if version is not None:
            if not isinstance(version, str) or not version.strip():
                raise TypeError(f"runtime_env['pip']['pip_version'] must be a version specifier "
                                f"such as '==23.2.1', got {version!r}")
            out["pip_version"] = version.strip()
        return out
    return {"packages": _validate_pip_packages(value), "pip_check": False}


def _validate_setup_hook(value: Any) -> str:
    """A callable (pickled now, so an unpicklable one fails at the call site)
    or the dotted name of an importable function, as Ray accepts."""
    if isinstance(value, str):
        if value.startswith(HOOK_PICKLE_PREFIX) or _HOOK_NAME_RE.match(value):
            return value
        raise ValueError(f"runtime_env['worker_process_setup_hook']={value!r} must be a callable "
                         f"or the dotted name of an importable function such as 'mypkg.setup'")
    if not callable(value):
        raise TypeError(f"runtime_env['worker_process_setup_hook'] must be a callable or a "
                        f"'module.function' string, got {type(value).__name__} {value!r}")
    import base64

    import cloudpickle

    from meshray.exceptions import RuntimeEnvSetupError
    try:
        blob = cloudpickle.dumps(value)
    except Exception as exc:  # noqa: BLE001 - any pickling failure: say which field
        raise RuntimeEnvSetupError(
            f"Failed to export the setup function runtime_env['worker_process_setup_hook']="
            f"{value!r}: it cannot be pickled ({type(exc).__name__}: {exc})") from exc
    return HOOK_PICKLE_PREFIX + base64.b64encode(blob).decode("ascii")


def _validate_config(value: Any) -> dict:
    if not isinstance(value, dict):
        raise TypeError(f"runtime_env['config'] must be a dict, got {value!r}")
    unknown = set(value) - set(CONFIG_DEFAULTS)
    if unknown:
        raise ValueError(f"runtime_env['config'] has unknown key(s) {sorted(unknown)}; "
                         f"supported: {sorted(CONFIG_DEFAULTS)}")
    out = dict(CONFIG_DEFAULTS)
    out.update(value)
    timeout = out["setup_timeout_seconds"]
    if isinstance(timeout, bool) or not isinstance(timeout, int) or (timeout <= 0 and timeout != -1):
        raise ValueError(f"runtime_env['config']['setup_timeout_seconds']={timeout!r} must be a "
                         f"positive int, or -1 for no timeout")
    if not isinstance(out["eager_install"], bool):
        raise TypeError(f"runtime_env['config']['eager_install'] must be a bool, "
                        f"got {out['eager_install']!r}")
    return out


def validate_runtime_env(runtime_env: dict | None) -> dict | None:
    """Check a runtime_env and return its normalised copy (or None).

    Raises TypeError for a value of the wrong type and ValueError for an
    unknown or unsupported field or a path that is not there.
    """
    if runtime_env is None:
        return None
    if not isinstance(runtime_env, dict):
        raise TypeError(f"runtime_env must be a dict, got {type(runtime_env).__name__}")
    fields = {k for k, v in runtime_env.items() if v is not None}
    unknown = set(runtime_env) - RAY_FIELDS
    if unknown:
        raise ValueError(f"runtime_env has unknown field(s) {sorted(unknown)}; "
                         f"supported fields are {sorted(SUPPORTED_FIELDS)}")
    managers = [f for f in _ENV_MANAGERS if f in fields]
    unsupported = sorted(fields & UNSUPPORTED_FIELDS)
    if unsupported:
        advice = "; ".join(f"{f!r}: {_UNSUPPORTED_ADVICE[f]}" for f in unsupported)
        clash = (f" ({' and '.join(repr(m) for m in managers)} cannot be combined either: "
                 f"a worker has one Python environment)" if len(managers) > 1 else "")
        raise ValueError(f"runtime_env field(s) {unsupported} are not supported by meshray "
                         f"(supported: {sorted(SUPPORTED_FIELDS)}){clash}. Instead -- {advice}")
    out: dict[str, Any] = {}
    env_vars = runtime_env.get("env_vars")
    if env_vars is not None:
        if not isinstance(env_vars, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()):
            raise TypeError(f"runtime_env['env_vars'] must be a dict of str to str, got {env_vars!r}")
        bad = [k for k in env_vars if not k or "=" in k or "\0" in k]
        if bad:
            raise ValueError(f"runtime_env['env_vars'] has invalid variable name(s) {bad!r}")
        out["env_vars"] = dict(env_vars)
    if runtime_env.get("working_dir") is not None:
        out["working_dir"] = _validate_working_dir(runtime_env["working_dir"])
    if runtime_env.get("py_modules") is not None:
        out["py_modules"] = _validate_py_modules(runtime_env["py_modules"])
    if runtime_env.get("excludes") is not None:
        out["excludes"] = _validate_excludes(runtime_env["excludes"])
    if runtime_env.get("pip") is not None:
        out["pip"] = _validate_pip(runtime_env["pip"])
    if runtime_env.get("config") is not None:
        out["config"] = _validate_config(runtime_env["config"])
    if runtime_env.get("worker_process_setup_hook") is not None:
        out["worker_process_setup_hook"] = _validate_setup_hook(
            runtime_env["worker_process_setup_hook"])
    return out


def runtime_env_config(runtime_env: dict | None) -> dict:
    """The effective `config` (defaults filled in), for callers that only need the knobs."""
    config = (runtime_env or {}).get("config")
    return _validate_config(config) if config is not None else dict(CONFIG_DEFAULTS)


def merge_runtime_envs(parent: dict | None, child: dict | None) -> dict | None:
    """The env a child task or actor runs in, given its parent's and its own.

    Ray's rule: `env_vars` merge key by key with the child winning; every other
    field the child sets replaces the parent's wholesale (merging two pip lists
    or two working dirs would produce an environment nobody wrote down).
    Pure: neither argument is modified.
    """
    if not parent and not child:
        return copy.deepcopy(child if child is not None else parent)
    merged = copy.deepcopy(parent or {})
    for key, value in (child or {}).items():
        if key == "env_vars" and value is not None:
            merged["env_vars"] = {**(merged.get("env_vars") or {}), **value}
        else:
            merged[key] = copy.deepcopy(value)
    return merged
