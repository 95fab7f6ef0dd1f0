"""Job records: what a submitted job is, which status moves are allowed, and
how records are written to etcd.

A job lives in one etcd record (``keyspace.job``), sealed like every record
(coordination/seal.py). Records are shared by every node, so two rules keep
racing nodes honest:

- a record is created by a create-if-absent transaction: a repeated
  ``submission_id`` is refused, and the job never runs twice;
- every later change is a compare-and-swap on the record's mod revision,
  computed by a pure function of the record read (``apply_change``). A change
  that is no longer allowed once the record moved on (a second node marking a
  lost job FAILED, a supervisor starting a job already STOPPED) is refused by
  the transition table rather than overwriting the winner.

The fields are Ray's JobDetails fields, with times in milliseconds since the
epoch as Ray has them; meshray's own fields (``attempt``, ``max_retries``,
``stop_requested``, ``log_file``) ride along and are shown too.
"""
from __future__ import annotations

import re
import time
from typing import Callable

from meshray.coordination import keyspace

__all__ = ["PENDING", "RUNNING", "STOPPED", "SUCCEEDED", "FAILED", "TERMINAL",
           "EtcdStore", "JobExistsError", "JobNotFoundError", "InvalidTransition", "JobStore",
           "apply_change", "check_submission", "driver_change", "log_file_name",
           "lost_supervisor_change", "new_record", "new_submission_id"]

PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED = (
    "PENDING", "RUNNING", "STOPPED", "SUCCEEDED", "FAILED")
TERMINAL = frozenset({STOPPED, SUCCEEDED, FAILED})
# RUNNING -> PENDING is a retry after the supervisor's node died (max_retries).
TRANSITIONS = {
    PENDING: frozenset({RUNNING, STOPPED, FAILED}),
    RUNNING: frozenset({SUCCEEDED, FAILED, STOPPED, PENDING}),
    STOPPED: frozenset(), SUCCEEDED: frozenset(), FAILED: frozenset(),
}
_SUBMISSION_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_CAS_TRIES = 20


class JobExistsError(ValueError):
    """A submission id already names a job."""


class JobNotFoundError(KeyError):
    """No job has this submission id."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "job not found"


class InvalidTransition(ValueError):
    """A status change the record's current status does not allow."""


def new_submission_id() -> str:
    """Ray's form: ``raysubmit_`` and 16 random letters and digits."""
    import secrets
    import string
    alphabet = string.ascii_letters + string.digits
    return "raysubmit_" + "".join(secrets.choice(alphabet) for _ in range(16))


def log_file_name(submission_id: str) -> str:
    """The entrypoint's log file in its node's logs dir (Ray's name)."""
    return f"job-driver-{submission_id}.log"


def _number(body: dict, name: str, *, integer: bool = False):
    value = body.get(name)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value < 0:
        what = "a whole number" if integer else "a number"
        raise ValueError(f"{name}={value!r}: expected {what} >= 0")
    return value


def check_submission(body) -> dict:
    """The checked fields of a job submission (POST /api/jobs/ body).

    ValueError names the field, the value and what was expected.
    """
    if not isinstance(body, dict):
        raise ValueError(f"request body={body!r}: expected a JSON object")
    entrypoint = body.get("entrypoint")
    if not isinstance(entrypoint, str) or not entrypoint.strip():
        raise ValueError(f"entrypoint={entrypoint!r}: expected a non-empty shell command string")
    submission_id = body.get("submission_id") or body.get("job_id")
    if submission_id is not None and (not isinstance(submission_id, str)
                                      or not _SUBMISSION_ID.fullmatch(submission_id)):
        raise ValueError(f"submission_id={submission_id!r}: expected 1-128 letters, digits, "
                         "'_', '.' or '-' (not starting with '.' or '-')")
    runtime_env = body.get("runtime_env")
    if runtime_env is not None and not isinstance(runtime_env, dict):
        raise ValueError(f"runtime_env={runtime_env!r}: expected a JSON object")
    metadata = body.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise ValueError(f"metadata={metadata!r}: expected an object of string to string")
    resources = body.get("entrypoint_resources")
    if resources is not None and not (isinstance(resources, dict) and all(
            isinstance(k, str) and k and not isinstance(v, bool) and isinstance(v, (int, float))
            and v >= 0 for k, v in resources.items())):
        raise ValueError(f"entrypoint_resources={resources!r}: expected an object of resource "
                         "name to a number >= 0")
    if resources and ({"CPU", "GPU", "memory"} & set(resources)):
        raise ValueError(f"entrypoint_resources={resources!r}: use entrypoint_num_cpus, "
                         "entrypoint_num_gpus and entrypoint_memory for CPU, GPU and memory")
    retries = _number(body, "max_retries", integer=True)
    return {"entrypoint": entrypoint, "submission_id": submission_id,
            "runtime_env": runtime_env or {}, "metadata": metadata or {},
            "entrypoint_num_cpus": _number(body, "entrypoint_num_cpus"),
            "entrypoint_num_gpus": _number(body, "entrypoint_num_gpus"),
            "entrypoint_memory": _number(body, "entrypoint_memory", integer=True),
            "entrypoint_resources": resources or None,
            "max_retries": retries or 0}


def new_record(checked: dict, *, submission_id: str, now_ms: int | None = None) -> dict:
    """A PENDING record for a checked submission."""
    return {
        "type": "SUBMISSION", "job_id": None, "submission_id": submission_id,
        "driver_info": None, "status": PENDING, "entrypoint": checked["entrypoint"],
        "message": "Job has not started yet. It may be waiting for resources "
                   "(entrypoint_num_cpus/gpus/resources) to become available.",
        "error_type": None,
        "start_time": int(time.time() * 1000) if now_ms is None else now_ms,
        "end_time": None, "metadata": checked["metadata"], "runtime_env": checked["runtime_env"],
        "driver_agent_http_address": None, "driver_node_id": None, "driver_exit_code": None,
        "entrypoint_num_cpus": checked["entrypoint_num_cpus"],
        "entrypoint_num_gpus": checked["entrypoint_num_gpus"],
        "entrypoint_memory": checked["entrypoint_memory"],
        "entrypoint_resources": checked["entrypoint_resources"],
        "attempt": 0, "max_retries": checked["max_retries"], "stop_requested": False,
        "log_file": log_file_name(submission_id),
    }


def apply_change(record: dict, change: dict) -> dict:
    """The record after `change` (a dict of fields; "status" moves it).

    Raises InvalidTransition when the status move is not in TRANSITIONS, and
    when a change is made for an attempt the record has left behind (a
    supervisor of an earlier attempt reporting late). Pure.
    """
    attempt = change.get("for_attempt")
    if attempt is not None and attempt != record.get("attempt", 0):
        raise InvalidTransition(
            f"job {record['submission_id']}: change for attempt {attempt}, but the job is on "
            f"attempt {record.get('attempt', 0)}")
    status = change.get("status")
    current = record["status"]
    if status is not None and status != current and status not in TRANSITIONS[current]:
        raise InvalidTransition(f"job {record['submission_id']} is {current}; it cannot "
                                f"become {status}")
    if status is None and current in TERMINAL and not change.get("allow_terminal"):
        raise InvalidTransition(f"job {record['submission_id']} is already {current}")
    updated = dict(record)
    updated.update({k: v for k, v in change.items() if k not in ("for_attempt", "allow_terminal")})
    if status in TERMINAL and updated.get("end_time") is None:
        updated["end_time"] = int(time.time() * 1000)
    return updated


def driver_change(*, job_hex: str, pid: int, node_ip: str, node_hex: str):
    """The change (a function of the record) that names a job's driver.

    Ray's ``job_id`` and ``driver_info`` of a submission: set once, by the
    first driver that connects to the node running the job's supervisor while
    the job is RUNNING; anything else raises InvalidTransition. Pure.
    """
    def change(record: dict) -> dict:
        sid = record["submission_id"]
        if record.get("status") != RUNNING:
            raise InvalidTransition(f"job {sid} is {record.get('status')}, not RUNNING")
        if record.get("driver_node_id") != node_hex:
            raise InvalidTransition(f"job {sid} runs on node {record.get('driver_node_id')}, "
                                    f"not on node {node_hex} where this driver is")
        if record.get("job_id"):
            raise InvalidTransition(f"job {sid} already has driver {record['job_id']}")
        return {"job_id": job_hex, "driver_info": {"id": job_hex, "node_ip_address": node_ip,
                                                   "pid": str(pid)},
                "for_attempt": record.get("attempt", 0)}
    return change


def lost_supervisor_change(record: dict, live_nodes) -> dict | None:
    """What to do with a job whose supervisor's node is gone, or None.

    A RUNNING job whose ``driver_node_id`` is not among the live nodes either
    goes back to PENDING for another attempt (``max_retries`` left) or FAILED
    with the cause; a stop that was asked for ends it STOPPED. Pure.
    """
    node = record.get("driver_node_id")
    if record.get("status") != RUNNING or not node or node in live_nodes:
        return None
    attempt = record.get("attempt", 0)
    cause = (f"Job supervisor actor died: its node {node} is gone (lease expired) "
             f"while the job was running (attempt {attempt}).")
    if record.get("stop_requested"):
        return {"status": STOPPED, "message": "Job was intentionally stopped. " + cause,
                "for_attempt": attempt}
    if attempt < record.get("max_retries", 0):
        return {"status": PENDING, "attempt": attempt + 1, "driver_node_id": None,
                "job_id": None, "driver_info": None,
                "message": cause + f" Retrying (attempt {attempt + 1} of "
                                   f"{record.get('max_retries', 0)}).",
                "for_attempt": attempt}
    return {"status": FAILED, "error_type": "JOB_SUPERVISOR_ACTOR_DIED", "message": cause,
            "for_attempt": attempt}


class EtcdStore:
    """Records in etcd, through a Coordinator (blocking: never on the event loop)."""

    def __init__(self, coordinator: Callable[[], object], keys: keyspace.Keyspace):
        self._coordinator = coordinator
        self.keys = keys

    def _client(self):
        coordinator = self._coordinator()
        if coordinator is None:
            raise ConnectionError("this node is not connected to etcd yet; try again")
        return coordinator


class JobStore(EtcdStore):
    """Job records."""

    def create(self, record: dict) -> None:
        """Create a new job record; JobExistsError when the id is taken (Ray's message)."""
        from meshray.coordination.client import KeyMissing, Put
        key = self.keys.job(record["submission_id"])
        result = self._client().txn([KeyMissing(key)], [Put(key, keyspace.encode_json(record))])
        if not result.succeeded:
            raise JobExistsError(f"Job with submission_id {record['submission_id']} already "
                                 "exists. Please use a different submission_id.")

    def get(self, submission_id: str) -> tuple[dict, int]:
        """(record, mod revision); JobNotFoundError when there is none."""
        value, revision = self._client().get(self.keys.job(submission_id))
        if value is None:
            raise JobNotFoundError(f"Job {submission_id} does not exist.")
        return keyspace.decode_json(value), revision

    def list(self) -> list[dict]:
        items, _revision = self._client().get_prefix(self.keys.jobs_prefix())
        out = []
        for item in items:
            try:
                out.append(keyspace.decode_json(item[1]))
            except ValueError:
                continue               # not a record we can read: leave it out
        return out

    def update(self, submission_id: str, change: dict | Callable[[dict], dict]) -> dict:
        """Apply a change by compare-and-swap; returns the record written.

        `change` is a dict for apply_change, or a function of the record
        returning one. Raises InvalidTransition (the record moved on) or
        JobNotFoundError.
        """
        from meshray.coordination.client import ModRevisionEquals, Put
        key = self.keys.job(submission_id)
        for _ in range(_CAS_TRIES):
            record, revision = self.get(submission_id)
            updated = apply_change(record, change(record) if callable(change) else change)
            result = self._client().txn([ModRevisionEquals(key, revision)],
                                        [Put(key, keyspace.encode_json(updated))])
            if result.succeeded:
                return updated
        raise RuntimeError(f"job {submission_id}: the record kept changing; {_CAS_TRIES} "
                           "compare-and-swap tries lost")

    def delete(self, submission_id: str) -> bool:
        """Delete a job in a terminal state (Ray's rule); False when there is none."""
        from meshray.coordination.client import Delete, ModRevisionEquals
        try:
            record, revision = self.get(submission_id)
        except JobNotFoundError:
            return False
        if record["status"] not in TERMINAL:
            raise InvalidTransition(f"Attempted to delete job '{submission_id}', but it is in "
                                    f"a non-terminal state {record['status']}.")
        key = self.keys.job(submission_id)
        return self._client().txn([ModRevisionEquals(key, revision)], [Delete(key)]).succeeded
