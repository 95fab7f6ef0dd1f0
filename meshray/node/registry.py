"""Where a machine's meshray nodes announce themselves to local tools.

Each running node daemon writes one small JSON file (pid, addresses, etcd
endpoints) under the run directory. `meshray stop` finds the nodes it
started through these files -- never by process name -- and
`init(address="auto")` finds a running cluster the same way.
"""
from __future__ import annotations

import json
import os
import tempfile

__all__ = ["run_dir", "write_record", "remove_record", "read_records", "pid_alive"]


def run_dir() -> str:
    path = os.environ.get("MESHRAY_RUN_DIR") or os.path.join(
        tempfile.gettempdir(), f"meshray-run-{os.getuid()}")
    os.makedirs(os.path.join(path, "nodes"), mode=0o700, exist_ok=True)
    return path


def _record_path(node_hex: str) -> str:
    return os.path.join(run_dir(), "nodes", f"{node_hex}.json")


def write_record(node_hex: str, record: dict) -> str:
    path = _record_path(node_hex)
    tmp = path + ".tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
        json.dump(record, handle)
    os.replace(tmp, path)
    return path


def remove_record(node_hex: str) -> None:
    try:
        os.unlink(_record_path(node_hex))
    except FileNotFoundError:
        pass
    # Leave nothing behind once the last node on this machine is gone.
    folder = run_dir()
    for path in (os.path.join(folder, "nodes"), folder):
        try:
            os.rmdir(path)
        except OSError:
            break


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_records(*, include_stale: bool = False) -> list[dict]:
    """Records of nodes on this machine, dropping those whose process is gone."""
    folder = os.path.join(run_dir(), "nodes")
    records = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(folder, name)) as handle:
                record = json.load(handle)
        except (OSError, ValueError):
            continue
        if include_stale or pid_alive(int(record.get("pid", 0))):
            records.append(record)
        else:
            remove_record(name[:-5])
    return records
