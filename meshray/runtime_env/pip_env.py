"""Building the virtual environment behind a `pip` runtime_env field.

Decision: the venv is created with `--without-pip` and *layered* on the node
daemon's own environment through a `.pth` file that calls
`site.addsitedir()` on every site-packages directory the daemon's interpreter
sees. So, in the worker:

* packages installed for the env come first on `sys.path` and win;
* then come meshray and its dependencies exactly as the daemon has them
  (editable installs too, because `addsitedir` processes their .pth files);
* pip treats those inherited packages as already satisfied, so an env that
  asks for something the node already has installs nothing extra.

This is Ray's `--system-site-packages` behaviour, but it also works when the
daemon itself runs in a venv (plain `--system-site-packages` would then skip
the daemon's venv, where meshray lives). pip itself is borrowed the same way,
which makes creating an env a ~50 ms `venv` call plus one `pip install`; only
when the daemon's interpreter has no pip does the env bootstrap its own with
`ensurepip` (slower). `pip_version` installs that pip into the env first, and
it then shadows the borrowed one.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Optional

from meshray.exceptions import RuntimeEnvSetupError

__all__ = [
    "Deadline", "LogFn", "normalize_pip_spec", "pip_env_hash", "interpreter_info",
    "build_pip_env", "run_logged", "venv_python", "PTH_NAME", "REQUIREMENTS_NAME",
]

LogFn = Callable[[str], None]
PTH_NAME = "_meshray_inherit.pth"
REQUIREMENTS_NAME = "meshray-requirements.txt"
_TAIL_LINES = 40
_PIP_FLAGS = ["--no-input", "--progress-bar", "off", "--disable-pip-version-check"]
# pip settings that would send the install somewhere other than the env.
_PIP_ENV_DROPPED = ("PIP_TARGET", "PIP_PREFIX", "PIP_ROOT", "PIP_USER", "PIP_REQUIRE_VIRTUALENV",
                    "PYTHONHOME")


class Deadline:
    """One time budget shared by every step of a setup (None = no limit)."""

    def __init__(self, seconds: Optional[float]):
        self.seconds = None if seconds is None or seconds < 0 else float(seconds)
        self._end = None if self.seconds is None else time.monotonic() + self.seconds

    def remaining(self) -> Optional[float]:
        return None if self._end is None else max(0.0, self._end - time.monotonic())

    def expired(self) -> bool:
        return self._end is not None and time.monotonic() >= self._end

    def error(self, doing: str, tail: str = "") -> RuntimeEnvSetupError:
        msg = (f"runtime_env setup timed out after {self.seconds:g}s while {doing} "
               f"(runtime_env['config']['setup_timeout_seconds']={self.seconds:g}; raise it, or "
               f"use -1 for no limit)")
        return RuntimeEnvSetupError(msg + (f"\nlast output:\n{tail}" if tail else ""))


def _safe_log(log: Optional[LogFn], line: str) -> None:
    if log is None:
        return
    try:
        log(line)
    except Exception:  # noqa: BLE001 - a broken log sink must not break the setup it reports on
        pass


def normalize_pip_spec(pip) -> dict:
    """The dict form {'packages': [...], 'pip_check': bool[, 'pip_version']} of any pip value."""
    from meshray.runtime_env.validation import validate_runtime_env
    spec = validate_runtime_env({"pip": pip})["pip"]
    spec["packages"] = list(dict.fromkeys(spec["packages"]))
    return spec


def pip_env_hash(spec: dict, base_python: str) -> str:
    """Name of the venv for a requirement set: equal sets share one env per node.

    Order and duplicates do not matter to pip, so they do not matter here;
    the interpreter does (a venv belongs to one Python), so it is hashed too.
    """
    key = {
        "v": 1,
        "packages": sorted(set(spec["packages"])),
        "pip_check": bool(spec.get("pip_check")),
        "pip_version": spec.get("pip_version"),
        "python": os.path.abspath(base_python),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


_INFO_CACHE: dict[str, dict] = {}
def _describe_interpreter() -> dict:
    """What `interpreter_info` needs, computed inside the interpreter in question."""
    import importlib.util
    import site
    dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return {"version": "%d.%d" % sys.version_info[:2],
            "site_dirs": [d for d in dirs if os.path.isdir(d)],
            "has_pip": importlib.util.find_spec("pip") is not None}


def interpreter_info(base_python: str) -> dict:
    """Version, site-packages dirs and pip availability of the daemon's interpreter.

    Asked once per interpreter (in-process when it is this one), because every
    env built on it needs the answer.
    """
    key = os.path.abspath(base_python)
    if key not in _INFO_CACHE:
        if key == os.path.abspath(sys.executable):
            _INFO_CACHE[key] = _describe_interpreter()
        else:
            import inspect
            script = ("import json, os, sys\n" + inspect.getsource(_describe_interpreter)
                      + "print(json.dumps(_describe_interpreter()))\n")
            proc = subprocess.run([base_python, "-c", script], capture_output=True, text=True,
                                  timeout=60)
            if proc.returncode != 0:
                raise RuntimeEnvSetupError(f"cannot inspect interpreter {base_python}: "
                                           f"{proc.stderr.strip()[-2000:]}")
            _INFO_CACHE[key] = json.loads(proc.stdout)
    return _INFO_CACHE[key]


def venv_python(venv_dir: str) -> str:
    return os.path.join(venv_dir, "bin", "python")


def _pip_environ() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _PIP_ENV_DROPPED}
    env["PYTHONUNBUFFERED"] = "1"
    env["PIP_NO_INPUT"] = "1"
    return env


def run_logged(cmd: list[str], *, log: Optional[LogFn], deadline: Deadline, what: str,
               env: Optional[dict] = None, prefix: str = "") -> list[str]:
    """Run a setup command, streaming each output line to `log`; return the tail.

    stdout and stderr are merged so the error text pip prints lands in the
    order it happened. The command runs in its own process group so a
    timeout kills pip *and* anything it spawned (build backends, git).
    """
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    if deadline.expired():
        raise deadline.error(what)
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace",
                                env=env if env is not None else _pip_environ(),
                                start_new_session=True)
    except OSError as exc:
        raise RuntimeEnvSetupError(f"{what}: cannot run {cmd[0]}: {exc}") from exc

    def pump() -> None:
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            _safe_log(log, prefix + line)

    reader = threading.Thread(target=pump, name="runtime-env-output", daemon=True)
    reader.start()
    try:
        proc.wait(timeout=deadline.remaining())
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        reader.join(5)
        raise deadline.error(what, "\n".join(tail)) from None
    except BaseException:
        _kill_group(proc)
        reader.join(5)
        raise
    reader.join(5)
    proc.stdout.close()
    if proc.returncode != 0:
        raise RuntimeEnvSetupError(f"{what} failed (exit code {proc.returncode}):\n"
                                   + "\n".join(tail))
    return list(tail)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    try:
        proc.stdout.close()
    except Exception:  # noqa: BLE001 - already closed
        pass


def build_pip_env(venv_dir: str, spec: dict, *, base_python: str, log: Optional[LogFn],
                  deadline: Deadline) -> str:
    """Create the venv at `venv_dir` and install `spec` into it; return its python.

    The caller owns locking and cleanup: on any exception the directory may
    be half made and must be removed.
    """
    started = time.monotonic()
    info = interpreter_info(base_python)
    packages = spec["packages"]
    _safe_log(log, f"runtime_env: creating pip environment {os.path.basename(venv_dir)} for "
                   f"{len(packages)} requirement(s): {' '.join(packages)}")
    run_logged([base_python, "-m", "venv", "--without-pip", venv_dir], log=log, deadline=deadline,
               what="creating the virtualenv", env=dict(os.environ))
    python = venv_python(venv_dir)
    site_dir = os.path.join(venv_dir, "lib", f"python{info['version']}", "site-packages")
    if not os.path.isdir(site_dir):
        raise RuntimeEnvSetupError(f"virtualenv {venv_dir} has no {site_dir}; is {base_python} "
                                   f"a standard CPython?")
    # One `import` line: .pth files execute those, and addsitedir also runs the
    # inherited dirs' own .pth files (editable installs, namespace packages).
    inherited = [d for d in info["site_dirs"] if os.path.abspath(d) != os.path.abspath(site_dir)]
    with open(os.path.join(site_dir, PTH_NAME), "w") as f:
        f.write(f"import site; list(map(site.addsitedir, {inherited!r}))\n")
    req_file = os.path.join(venv_dir, REQUIREMENTS_NAME)
    with open(req_file, "w") as f:
        f.write("\n".join(packages) + "\n")
    env = _pip_environ()
    if not info["has_pip"]:
        run_logged([python, "-m", "ensurepip", "--default-pip"], log=log, deadline=deadline,
                   what="bootstrapping pip with ensurepip", env=env, prefix="[pip] ")
    if spec.get("pip_version"):
        run_logged([python, "-m", "pip", "install", *_PIP_FLAGS, "pip" + spec["pip_version"]],
                   log=log, deadline=deadline, what=f"`pip install pip{spec['pip_version']}`",
                   env=env, prefix="[pip] ")
    if packages:
        listed = " ".join(packages)
        listed = listed if len(listed) <= 300 else listed[:297] + "..."
        run_logged([python, "-m", "pip", "install", *_PIP_FLAGS, "-r", req_file], log=log,
                   deadline=deadline, what=f"`pip install` of [{listed}]", env=env,
                   prefix="[pip] ")
    if spec.get("pip_check"):
        run_logged([python, "-m", "pip", "check"], log=log, deadline=deadline,
                   what="`pip check`", env=env, prefix="[pip] ")
    _safe_log(log, f"runtime_env: pip environment {os.path.basename(venv_dir)} ready in "
                   f"{time.monotonic() - started:.1f}s")
    return python
