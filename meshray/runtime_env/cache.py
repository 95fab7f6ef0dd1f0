"""The per-node cache of unpacked packages and pip environments.

Every worker started for an env needs its packages on local disk and its
venv built; doing that once per node (not once per worker or per task) is
what makes a runtime_env cheap after its first use. Layout under `root`:

    pkg/<sha256>.zip/       unpacked directory tree (working_dir, py_modules)
    pkg/<sha256>.whl/       unpacked py_modules wheel
    file/<sha256>_<name>/   one verbatim file (pip's local wheels and sdists)
    pip/<hash>/             a virtualenv; ready once it holds .meshray-ready
    meta/<key>.json         size of each entry; its mtime is the last use
    locks/                  flock files: shared while in use, exclusive to evict or build
    tmp/                    staging; an entry appears by an atomic rename

Several daemons (and threads) may share one root: a package is published by
renaming a fully unpacked directory into place (the loser of a race just
drops its copy); a venv, which cannot be moved after pip wrote absolute paths
into it, is built in place under an exclusive build lock. An entry in use
holds a shared flock, so no daemon evicts what another daemon's workers run in.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Union

from meshray.exceptions import RuntimeEnvSetupError
from meshray.runtime_env.packaging import PackageError, parse_uri, unpack_package
from meshray.runtime_env.pip_env import (
    Deadline, LogFn, _safe_log, build_pip_env, normalize_pip_spec, pip_env_hash, venv_python,
)
from meshray.runtime_env.validation import parse_size

__all__ = [
    "RuntimeEnvCache", "CacheEntryInfo", "choose_evictions", "default_cache_root",
    "default_cache_bytes", "CACHE_DIR_ENV", "CACHE_SIZE_ENV", "DEFAULT_CACHE_BYTES",
]

CACHE_DIR_ENV = "MESHRAY_RUNTIME_ENV_CACHE_DIR"
CACHE_SIZE_ENV = "MESHRAY_RUNTIME_ENV_CACHE_SIZE"
DEFAULT_CACHE_BYTES = 10 * 1024 ** 3
_READY = ".meshray-ready"
_STALE_TMP_S = 3600.0
_KINDS = ("pkg", "file", "pip")


def default_cache_root() -> str:
    """Per machine and user, outside any session dir: envs outlive one cluster session."""
    if os.environ.get(CACHE_DIR_ENV):
        return os.environ[CACHE_DIR_ENV]
    # Code is unpacked and run from here: the run dir is used only once it
    # has passed the ownership checks (a planted one raises).
    from meshray.common.private_files import checked_run_dir
    return os.path.join(checked_run_dir(), "runtime_env")


def default_cache_bytes() -> int:
    raw = os.environ.get(CACHE_SIZE_ENV)
    return DEFAULT_CACHE_BYTES if not raw else parse_size(raw, CACHE_SIZE_ENV)


@dataclass(frozen=True)
class CacheEntryInfo:
    """What the eviction policy may know about an entry."""
    key: str
    size: int
    last_used: float
    refs: int


def choose_evictions(entries: Iterable[CacheEntryInfo], max_bytes: int) -> list[str]:
    """Keys to delete, least recently used first, until the total fits `max_bytes`.

    Entries with references are never chosen, even if that leaves the cache
    over its limit: a running worker's files must not vanish under it.
    """
    entries = list(entries)
    total = sum(e.size for e in entries)
    victims = []
    for e in sorted((e for e in entries if e.refs <= 0), key=lambda e: (e.last_used, e.key)):
        if total <= max_bytes:
            break
        victims.append(e.key)
        total -= e.size
    return victims


@dataclass
class _Entry:
    size: int
    last_used: float
    refs: int = 0
    lock_fd: Optional[int] = None


def _du(path: str) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames + dirnames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


class RuntimeEnvCache:
    """Thread-safe, multi-process-safe cache; see the module docstring for the layout."""

    def __init__(self, root: Optional[str] = None, max_bytes: Optional[int] = None):
        self.root = os.path.abspath(root or default_cache_root())
        self.max_bytes = default_cache_bytes() if max_bytes is None else int(max_bytes)
        for sub in (*_KINDS, "meta", "locks", "tmp"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        self._lock = threading.RLock()
        self._key_locks: dict[str, threading.Lock] = {}
        self._entries: dict[str, _Entry] = {}
        self._clean_stale_tmp()
        with self._lock:
            self._rescan()

    # ---- keys and paths -------------------------------------------------
    @staticmethod
    def key_for_uri(uri: str) -> str:
        sha, kind, filename = parse_uri(uri)
        if kind == "file":
            return f"file/{sha}_{filename}"
        return f"pkg/{sha}.{'zip' if kind == 'dir' else 'whl'}"

    @staticmethod
    def key_for_pip(pip, base_python: str = sys.executable) -> str:
        return "pip/" + pip_env_hash(normalize_pip_spec(pip), base_python)

    def path_for(self, key: str) -> str:
        kind, _, name = key.partition("/")
        if kind not in _KINDS or not name or "/" in name or name in (".", ".."):
            raise KeyError(f"{key!r} is not a runtime_env cache key")
        return os.path.join(self.root, kind, name)

    def _flat(self, key: str) -> str:
        return key.replace("/", "__")

    def _ready(self, key: str) -> bool:
        path = self.path_for(key)
        if key.startswith("pip/"):
            return os.path.exists(os.path.join(path, _READY))
        return os.path.isdir(path)

    # ---- index ------------------------------------------------------------
    def _meta_path(self, key: str) -> str:
        return os.path.join(self.root, "meta", self._flat(key) + ".json")

    def _write_meta(self, key: str, size: int) -> None:
        tmp = self._meta_path(key) + f".{os.getpid()}.{threading.get_ident()}"
        with open(tmp, "w") as f:
            json.dump({"size": size}, f)
        os.replace(tmp, self._meta_path(key))

    def _index(self, key: str) -> _Entry:
        """Add a ready entry found on disk (made by us earlier or by another process)."""
        meta = self._meta_path(key)
        try:
            with open(meta) as f:
                size = int(json.load(f)["size"])
            last_used = os.stat(meta).st_mtime
        except (OSError, ValueError, KeyError, TypeError):
            size = _du(self.path_for(key))
            last_used = time.time()
            with contextlib.suppress(OSError):
                self._write_meta(key, size)
        entry = self._entries[key] = _Entry(size=size, last_used=last_used)
        return entry

    def _rescan(self) -> None:
        seen = set()
        for kind in _KINDS:
            for name in os.listdir(os.path.join(self.root, kind)):
                key = f"{kind}/{name}"
                if self._ready(key):
                    seen.add(key)
                    if key not in self._entries:
                        self._index(key)
        for key in [k for k, e in self._entries.items() if k not in seen and e.refs == 0]:
            del self._entries[key]

    def _touch(self, key: str, entry: _Entry) -> None:
        entry.last_used = time.time()
        with contextlib.suppress(OSError):
            os.utime(self._meta_path(key))

    def _lookup(self, key: str, acquire: bool) -> bool:
        """Whether `key` is ready (indexing, touching and optionally acquiring it)."""
        with self._lock:
            if not self._ready(key):
                entry = self._entries.get(key)
                if entry is not None and entry.refs == 0:
                    del self._entries[key]
                return False
            entry = self._entries.get(key) or self._index(key)
            self._touch(key, entry)
            return self._acquire_locked(key, entry) if acquire else True

    def _acquire_locked(self, key: str, entry: _Entry) -> bool:
        if entry.refs == 0:
            fd = os.open(os.path.join(self.root, "locks", self._flat(key) + ".use"),
                         os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(fd, fcntl.LOCK_SH)     # waits out another daemon's eviction of it
            if not self._ready(key):           # ...which may have just removed it
                os.close(fd)
                self._entries.pop(key, None)
                return False
            entry.lock_fd = fd
        entry.refs += 1
        return True

    # ---- reference counts --------------------------------------------------
    def acquire(self, key: str) -> None:
        """Pin an entry for a running worker; raises KeyError if it is not in the cache."""
        if not self._lookup(key, acquire=True):
            raise KeyError(f"runtime_env cache {self.root} has no ready entry {key!r}")

    def release(self, key: str) -> None:
        """Unpin an entry; at zero references it becomes evictable."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.refs <= 0:
                raise ValueError(f"runtime_env cache entry {key!r} released more often than "
                                 f"it was acquired")
            entry.refs -= 1
            if entry.refs == 0 and entry.lock_fd is not None:
                os.close(entry.lock_fd)        # closing drops the shared flock
                entry.lock_fd = None
            self._touch(key, entry)

    def entries(self) -> list[CacheEntryInfo]:
        with self._lock:
            return [CacheEntryInfo(k, e.size, e.last_used, e.refs) for k, e in self._entries.items()]

    def total_bytes(self) -> int:
        with self._lock:
            return sum(e.size for e in self._entries.values())

    # ---- building ------------------------------------------------------------
    def _key_lock(self, key: str) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())

    @contextlib.contextmanager
    def _file_lock(self, key: str, suffix: str, deadline: Deadline) -> Iterator[None]:
        fd = os.open(os.path.join(self.root, "locks", self._flat(key) + suffix),
                     os.O_CREAT | os.O_RDWR, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if deadline.expired():
                        raise deadline.error(f"waiting for another process building {key}")
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)

    def ensure_package(self, uri: str, fetch: Callable[[], bytes], *,
                       acquire: bool = False) -> str:
        """Local path of a package, unpacking it first if this node lacks it.

        `fetch` is called only on a miss, at most once per call. Returns the
        directory for trees and wheels, or the file's path for verbatim files.
        Raises RuntimeEnvSetupError when fetching or unpacking fails.
        """
        try:
            _, kind, filename = parse_uri(uri)
        except PackageError as exc:
            raise RuntimeEnvSetupError(str(exc)) from exc
        key = self.key_for_uri(uri)
        path = self.path_for(key)
        usable = os.path.join(path, filename) if kind == "file" else path
        for _ in range(3):                     # a concurrent eviction can undo a lookup
            if self._lookup(key, acquire):
                return usable
            with self._key_lock(key):
                if self._lookup(key, acquire):
                    return usable
                self._materialise(uri, key, path, fetch)
        raise RuntimeEnvSetupError(f"package {uri} kept disappearing from {self.root} while "
                                   f"being set up (is the cache far too small?)")

    def _materialise(self, uri: str, key: str, path: str, fetch: Callable[[], bytes]) -> None:
        try:
            data = fetch()
        except RuntimeEnvSetupError:
            raise
        except Exception as exc:  # noqa: BLE001 - the daemon's transport errors, reported as setup errors
            raise RuntimeEnvSetupError(f"fetching {uri} failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise RuntimeEnvSetupError(f"fetch for {uri} returned {type(data).__name__}, not bytes")
        tmp = tempfile.mkdtemp(prefix="pkg-", dir=os.path.join(self.root, "tmp"))
        try:
            unpack_package(uri, bytes(data), tmp)
            size = _du(tmp)
            try:
                os.rename(tmp, path)
            except OSError:
                if not os.path.isdir(path):    # not "someone else published it first"
                    raise
            else:
                self._write_meta(key, size)
        except PackageError as exc:
            raise RuntimeEnvSetupError(str(exc)) from exc
        except OSError as exc:
            raise RuntimeEnvSetupError(f"unpacking {uri} into {path} failed: {exc}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def ensure_pip_env(self, pip, log: Optional[LogFn] = None,
                       timeout: Union[None, float, Deadline] = None, *,
                       base_python: str = sys.executable, acquire: bool = False) -> str:
        """Python executable of the venv for a pip requirement set, building it on a miss.

        `pip` is any form the runtime_env field accepts (list, requirements
        file path, or dict). Output lines go to `log` as they appear. On
        failure or timeout the half-made venv is removed and
        RuntimeEnvSetupError carries the tail of pip's output.
        """
        spec = normalize_pip_spec(pip)
        key = "pip/" + pip_env_hash(spec, base_python)
        path = self.path_for(key)
        deadline = timeout if isinstance(timeout, Deadline) else Deadline(timeout)
        built = False
        for _ in range(3):
            if self._lookup(key, acquire):
                if not built:
                    _safe_log(log, f"runtime_env: reusing pip environment {key[4:]}")
                return venv_python(path)
            with self._key_lock(key):
                if self._lookup(key, acquire):
                    return venv_python(path)
                with self._file_lock(key, ".build", deadline):
                    if not self._ready(key):
                        self._build_venv(key, path, spec, base_python, log, deadline)
                        built = True
        raise RuntimeEnvSetupError(f"pip environment {path} kept disappearing while being set up "
                                   f"(is the cache far too small?)")

    def _build_venv(self, key: str, path: str, spec: dict, base_python: str,
                    log: Optional[LogFn], deadline: Deadline) -> None:
        if os.path.exists(path):               # left by a build that crashed
            shutil.rmtree(path, ignore_errors=True)
        try:
            build_pip_env(path, spec, base_python=base_python, log=log, deadline=deadline)
            size = _du(path)
            self._write_meta(key, size)
            with open(os.path.join(path, _READY), "w") as f:
                json.dump({"pip": spec, "python": base_python, "created": time.time()}, f)
        except BaseException as exc:
            shutil.rmtree(path, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.unlink(self._meta_path(key))
            _safe_log(log, f"runtime_env: pip environment {key[4:]} failed; removed it")
            if isinstance(exc, (RuntimeEnvSetupError, KeyboardInterrupt, SystemExit)):
                raise
            raise RuntimeEnvSetupError(f"creating pip environment {path} failed: "
                                       f"{type(exc).__name__}: {exc}") from exc

    # ---- eviction ----------------------------------------------------------------
    def evict(self) -> list[str]:
        """Delete least-recently-used unpinned entries until the cache fits; return their keys."""
        removed, trash = [], []
        with self._lock:
            self._rescan()
            self._collect_crashed_builds(trash)
            for key in choose_evictions(self.entries(), self.max_bytes):
                fd = os.open(os.path.join(self.root, "locks", self._flat(key) + ".use"),
                             os.O_CREAT | os.O_RDWR, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)               # in use by another daemon's workers
                    continue
                try:
                    target = tempfile.mkdtemp(prefix="trash-", dir=os.path.join(self.root, "tmp"))
                    os.rename(self.path_for(key), os.path.join(target, "entry"))
                    trash.append(target)
                    with contextlib.suppress(OSError):
                        os.unlink(self._meta_path(key))
                    self._entries.pop(key, None)
                    removed.append(key)
                except OSError:
                    pass
                finally:
                    os.close(fd)
        for target in trash:
            shutil.rmtree(target, ignore_errors=True)
        return removed

    def _collect_crashed_builds(self, trash: list) -> None:
        """Half-made venvs whose builder is gone (its build lock is free)."""
        for name in os.listdir(os.path.join(self.root, "pip")):
            key = f"pip/{name}"
            if self._ready(key) or self._key_lock(key).locked():
                continue
            fd = os.open(os.path.join(self.root, "locks", self._flat(key) + ".build"),
                         os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if not self._ready(key):
                    target = tempfile.mkdtemp(prefix="trash-", dir=os.path.join(self.root, "tmp"))
                    os.rename(self.path_for(key), os.path.join(target, "entry"))
                    trash.append(target)
            except (BlockingIOError, OSError):
                pass
            finally:
                os.close(fd)

    def _clean_stale_tmp(self) -> None:
        tmp = os.path.join(self.root, "tmp")
        now = time.time()
        for name in os.listdir(tmp):
            path = os.path.join(tmp, name)
            with contextlib.suppress(OSError):
                if now - os.stat(path).st_mtime > _STALE_TMP_S:
                    shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        """Drop every pin this object holds (for a daemon shutting down)."""
        with self._lock:
            for entry in self._entries.values():
                if entry.lock_fd is not None:
                    os.close(entry.lock_fd)
                    entry.lock_fd = None
                entry.refs = 0
