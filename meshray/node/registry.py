"""Where a machine's meshray nodes announce themselves to local tools.

Each running node daemon writes one small JSON file (pid, process start
time, addresses, etcd endpoints) under the run directory. `meshray stop`
finds the nodes it started through these files -- never by process name --
and `init(address="auto")` finds a running cluster the same way.

The run directory sits in the shared temp dir, so its content is trusted
only after the checks in :mod:`meshray.common.private_files` (owned by us, not
writable by anyone else, no symlinks), and a record is believed only while
its pid is still the daemon that wrote it: same uid, same start time, a
node daemon's command line. A pid is reused once its process is gone, so a
record that outlived its daemon must never turn into a signal for whatever
process got the number next.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
from dataclasses import dataclass, field

from meshray.common.private_files import (
    UnsafePathError,
    open_private_dir,
    read_private_file,
    run_dir_path as _run_dir_path,
)

__all__ = ["RecordScan", "daemon_process", "pid_alive", "read_records", "record_problem",
           "remove_record", "run_dir", "scan_records", "write_record"]

log = logging.getLogger(__name__)

_NODES = "nodes"
_NODE_HEX = re.compile(r"^[0-9a-f]{8,64}$")
DAEMON_MODULE = "meshray.node.main"
# psutil derives start times from clock ticks since boot; one record's value
# and a fresh reading of the same process agree far closer than this.
_START_TIME_SLACK_S = 0.5


def _open_nodes_dir(create: bool) -> int:
    """The checked descriptor of <run dir>/nodes (FileNotFoundError if missing and not create)."""
    path = _run_dir_path()
    if create:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            os.makedirs(parent, mode=0o700, exist_ok=True)
    run_fd = open_private_dir(path, what="meshray run dir", create=create)
    try:
        return open_private_dir(_NODES, what="node registry dir", create=create,
                                dir_fd=run_fd, shown=os.path.join(path, _NODES))
    finally:
        os.close(run_fd)


def run_dir() -> str:
    """The run dir's path, created (0700) if missing, refused if anyone else controls it."""
    os.close(_open_nodes_dir(create=True))
    return _run_dir_path()


def _check_hex(node_hex: str) -> str:
    if not isinstance(node_hex, str) or not _NODE_HEX.match(node_hex):
        raise ValueError(f"node_hex={node_hex!r} must be a lowercase hex node id")
    return node_hex


def write_record(node_hex: str, record: dict) -> str:
    """Publish `record` for `node_hex`, atomically and owner-only; returns its path."""
    name = f"{_check_hex(node_hex)}.json"
    tmp = f".{node_hex}.{os.getpid()}.{threading.get_ident()}.tmp"   # writers never share one
    fd = _open_nodes_dir(create=True)
    try:
        try:
            os.unlink(tmp, dir_fd=fd)      # left by a crash of an earlier process
        except FileNotFoundError:
            pass
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600, dir_fd=fd)
        with open(out, "w") as handle:
            json.dump(record, handle)
        os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
    finally:
        os.close(fd)
    return os.path.join(_run_dir_path(), _NODES, name)


def remove_record(node_hex: str) -> None:
    """Delete a node's record; the run dir goes too once no node is left on this machine."""
    name = f"{_check_hex(node_hex)}.json"
    try:
        fd = _open_nodes_dir(create=False)
    except FileNotFoundError:
        return
    except UnsafePathError as exc:     # never touch a directory someone else controls
        log.warning("not removing node record %s: %s", name, exc)
        return
    try:
        try:
            os.unlink(name, dir_fd=fd)
        except FileNotFoundError:
            pass
        if os.listdir(fd):
            return
    finally:
        os.close(fd)
    path = _run_dir_path()
    for folder in (os.path.join(path, _NODES), path):
        try:
            os.rmdir(folder)
        except OSError:
            break


def record_problem(record, node_hex: str) -> str | None:
    """Why a parsed record is malformed, or None. Pure: only the record's own fields."""
    if not isinstance(record, dict):
        return f"not a JSON object ({type(record).__name__})"
    if record.get("node_id") != node_hex:
        return f"node_id {record.get('node_id')!r} does not match the file name"
    pid = record.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return f"pid {pid!r} is not a positive integer"
    started = record.get("create_time")
    if isinstance(started, bool) or not isinstance(started, (int, float)):
        return "no process start time (create_time), so its pid cannot be verified"
    session = record.get("session_dir")
    if not isinstance(session, str) or not os.path.isabs(session):
        return f"session_dir {session!r} is not an absolute path"
    local = record.get("local_address")
    if not (isinstance(local, str) and local.startswith(f"unix:{session.rstrip('/')}/")
            and "/../" not in local):
        return f"local_address {local!r} is not a unix socket inside its session dir"
    for key in ("address", "etcd"):
        if not isinstance(record.get(key), str):
            return f"{key} {record.get(key)!r} is not a string"
    return None


def daemon_process(record: dict):
    """(psutil.Process, None) when the record's pid is still its daemon, else (None, why).

    Signal the returned Process object, not the pid: psutil re-checks the
    start time before sending, so a pid reused in between is not hit.
    """
    import psutil

    pid = record["pid"]
    try:
        process = psutil.Process(pid)
        uids = process.uids()
        if uids.real != os.geteuid() or uids.effective != os.geteuid():
            return None, f"pid {pid} now belongs to uid {uids.real}, not to this user"
        if abs(process.create_time() - float(record["create_time"])) > _START_TIME_SLACK_S:
            return None, f"pid {pid} is a different process than the daemon that wrote the record"
        if DAEMON_MODULE not in process.cmdline():
            return None, f"pid {pid} is not a meshray node daemon"
    except psutil.NoSuchProcess:
        return None, f"pid {pid} is gone"
    except psutil.AccessDenied:
        return None, f"pid {pid} cannot be inspected (another user's process)"
    return process, None


@dataclass
class RecordScan:
    """What the run dir holds: live daemons of ours, and what was set aside and why."""
    records: list = field(default_factory=list)
    refused: list = field(default_factory=list)   # messages: not trustworthy, left alone
    stale: list = field(default_factory=list)     # messages: their daemon is gone (removed)


def scan_records() -> RecordScan:
    """Read every record; raises UnsafePathError when the run dir itself is not ours.

    A record file that fails the ownership rule, does not parse, or names a
    session dir that is not ours is refused (reported, left in place). A
    well-formed record whose daemon is gone is stale: reported and removed.
    """
    scan = RecordScan()
    try:
        fd = _open_nodes_dir(create=False)
    except FileNotFoundError:
        return scan
    try:
        names = sorted(os.listdir(fd))
        base = os.path.join(_run_dir_path(), _NODES)
        for name in names:
            if not name.endswith(".json") or not _NODE_HEX.match(name[:-5]):
                continue
            shown = os.path.join(base, name)
            try:
                record = json.loads(read_private_file(name, what="node record", dir_fd=fd,
                                                      shown=shown))
            except FileNotFoundError:
                continue                  # removed while we looked
            except UnsafePathError as exc:
                scan.refused.append(str(exc))
                continue
            except ValueError as exc:
                scan.refused.append(f"node record {shown!r} is not valid JSON: {exc}")
                continue
            problem = record_problem(record, name[:-5])
            if problem is not None:
                scan.refused.append(f"node record {shown!r}: {problem}")
                continue
            process, why = daemon_process(record)
            if process is None:
                scan.stale.append(f"node record {shown!r}: {why}")
                try:
                    os.unlink(name, dir_fd=fd)
                except FileNotFoundError:
                    pass
                continue
            problem = _session_dir_problem(record["session_dir"])
            if problem is not None:
                scan.refused.append(f"node record {shown!r}: {problem}")
                continue
            scan.records.append(record)
    finally:
        os.close(fd)
    return scan


def read_records() -> list:
    """The records of this user's live node daemons (scan_records().records)."""
    return scan_records().records


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists (ours or not). Never a reason to signal it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _session_dir_problem(path: str) -> str | None:
    try:
        os.close(open_private_dir(path, what="session dir"))
    except FileNotFoundError:
        return f"session dir {path!r} does not exist"
    except UnsafePathError as exc:
        return str(exc)
    return None
