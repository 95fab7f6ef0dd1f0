"""Ray-compatible placement groups (`ray.util.placement_group`).

Programs written for Ray use these names unchanged::

    from meshray.util.placement_group import placement_group, remove_placement_group
    pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
    ray.get(pg.ready())

This module never touches etcd. Every argument is checked here, before any
I/O, and the work is asked of the local node daemon through
``core.request("pg_*", payload)`` (JSON in, JSON out); the daemon's
placement-group worker runs the etcd transactions, batching what queues up.
docs/placement-groups.md lists the requests and their replies.

As in Ray, creating an unnamed group and removing a group do not wait for
etcd: the request is sent and the call returns (the node receives requests
in the order they are sent, and answers reads only after the writes queued
before them, so a later read sees them). ``wait()``/``ready()`` observe the
creation. A named creation waits, so that a taken name raises here.
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
import time
from typing import Any, Dict, List, Optional

from meshray.core import state as state_mod
from meshray.placement.policy import check_placement_group_index, validate_request_fits_bundle
from meshray.placement.records import (
    CREATED,
    REMOVED,
    PlacementGroupID,
    PlacementGroupRecord,
    table_entry,
    validate_placement_group_args,
)
from meshray.scheduler.strategies import PlacementGroupSchedulingStrategy

__all__ = [
    "PlacementGroup",
    "PlacementGroupID",
    "placement_group",
    "remove_placement_group",
    "get_placement_group",
    "placement_group_table",
    "get_current_placement_group",
    "check_placement_group_index",
    "validate_request_fits_bundle",
]

log = logging.getLogger(__name__)

_REQUEST_TIMEOUT_S = 30.0
_WAIT_POLL_MIN_S = 0.01
_WAIT_POLL_MAX_S = 0.2
_FLUSH_TIMEOUT_S = 5.0


# --------------------------------------------------------------------------
# Talking to the node


def _core():
    return state_mod.ensure_core()


def _request(method: str, payload: Dict[str, Any], timeout: float = _REQUEST_TIMEOUT_S):
    """Send one ``pg_*`` request; turn a structured error into its exception.

    The daemon answers mistakes of the caller (taken name, bad arguments)
    with ``{"error": {"type": "ValueError", ...}}`` rather than failing the
    request, because a failed request surfaces as RaySystemError and Ray
    programs expect ValueError.
    """
    return _checked(method, _core().request(method, payload, timeout=timeout))


def _checked(method: str, reply):
    error = reply.get("error") if isinstance(reply, dict) else None
    if error:
        message = error.get("message") or f"{method} failed"
        if error.get("type") == "ValueError":
            raise ValueError(message)
        from meshray.exceptions import RaySystemError
        raise RaySystemError(f"{method}: {message}")
    return reply


# Requests sent without waiting for their replies, so that shutdown() can
# let them reach the node before it disconnects.
_in_flight: set = set()
_in_flight_lock = threading.Lock()


def _send(method: str, payload: Dict[str, Any]) -> concurrent.futures.Future:
    """Send a request and return at once; the future gets the checked reply.

    Falls back to a synchronous request when the core cannot send
    asynchronously (the future is then already done)."""
    core = _core()
    result: concurrent.futures.Future = concurrent.futures.Future()
    send = getattr(core, "request_async", None)
    if send is None:
        try:
            result.set_result(_request(method, payload))
        except Exception as exc:  # noqa: BLE001 - handed to whoever looks
            result.set_exception(exc)
        return result

    def done(raw: concurrent.futures.Future) -> None:
        with _in_flight_lock:
            _in_flight.discard(result)
        try:
            reply = raw.result()
            if reply.error:
                from meshray.exceptions import RaySystemError
                raise RaySystemError(f"node failed to answer {method!r}: {reply.error}")
            result.set_result(_checked(method, json.loads(reply.payload)))
        except Exception as exc:  # noqa: BLE001 - handed to whoever looks
            result.set_exception(exc)

    with _in_flight_lock:
        _in_flight.add(result)
    send(method, payload).add_done_callback(done)
    return result


def _flush(timeout: float = _FLUSH_TIMEOUT_S) -> None:
    """Wait (bounded) until every request sent without waiting is answered.
    meshray.shutdown() calls this before it disconnects."""
    with _in_flight_lock:
        pending = list(_in_flight)
    if pending:
        concurrent.futures.wait(pending, timeout)


def _log_failure(what: str):
    def report(future: concurrent.futures.Future) -> None:
        exc = future.exception()
        if exc is not None:
            log.warning("%s failed: %s", what, exc)
    return report


def _record_of(pg_id: PlacementGroupID) -> Optional[PlacementGroupRecord]:
    reply = _request("pg_get", {"pg_id": pg_id.hex()})
    data = reply.get("record")
    return PlacementGroupRecord.from_dict(data) if data else None


def _job_and_namespace(core) -> tuple:
    # Inside a task the job is the task's (a worker may serve several jobs
    # over its life); in a driver it is the driver's own.
    spec = state_mod.current_spec()
    job = getattr(spec, "job_id", b"") if spec is not None else b""
    job = job or getattr(core, "job_id", b"") or state_mod.state.job_id or b""
    namespace = getattr(core, "namespace", None)
    if namespace is None:
        namespace = state_mod.state.namespace
    return (job.hex() if isinstance(job, (bytes, bytearray)) else str(job)), namespace or ""


# --------------------------------------------------------------------------
# The handle


def _reservation_check(placement_group: "PlacementGroup") -> "PlacementGroup":
    # Runs inside bundle 0 only once the group is reserved: its completion is
    # what `ready()` waits for, and its value is the group itself (as in Ray).
    return placement_group


_ready_function = None


def _ready_remote_function():
    global _ready_function
    if _ready_function is None:
        from meshray.core.remote_function import RemoteFunction
        _ready_function = RemoteFunction(_reservation_check,
                                         {"num_cpus": 0, "max_retries": -1})
    return _ready_function


class PlacementGroup:
    """A handle to a placement group. Cheap, picklable, compared by id.

    It carries the bundle list so that tasks which receive it (pickled inside
    a scheduling strategy) can check their requests without asking anyone.
    """

    @staticmethod
    def empty() -> "PlacementGroup":
        return PlacementGroup(PlacementGroupID.nil())

    def __init__(self, id: PlacementGroupID, bundle_cache: Optional[List[Dict]] = None):
        if not isinstance(id, PlacementGroupID):
            raise TypeError(f"PlacementGroup needs a PlacementGroupID, got {type(id).__name__}")
        self.id = id
        self.bundle_cache = [dict(b) for b in bundle_cache] if bundle_cache else None
        # The reply to this handle's own creation request (not pickled): the
        # first wait() takes its answer from it instead of asking the node.
        self._creation: Optional[concurrent.futures.Future] = None

    @property
    def is_empty(self) -> bool:
        return self.id.is_nil()

    def ready(self):
        """An ObjectRef that resolves to this group once it is reserved.

        A zero-resource task is scheduled into bundle 0; the daemon holds it
        until the group is CREATED, so ``get``/``wait`` on it behave as in
        Ray, and a removed group fails it with TaskPlacementGroupRemoved.
        """
        if self.is_empty:
            raise ValueError("ready() cannot be called on the empty placement group")
        self._fill_bundle_cache()
        strategy = PlacementGroupSchedulingStrategy(self, 0)
        return _ready_remote_function().options(scheduling_strategy=strategy).remote(self)

    def wait(self, timeout_seconds: float = 30) -> bool:
        """True once the group is CREATED, False if ``timeout_seconds`` passed
        first (or it was removed). Polls the record, so the timeout holds
        even for a group that can never be placed."""
        if isinstance(timeout_seconds, bool) or not isinstance(timeout_seconds, (int, float)):
            raise ValueError(f"wait() timeout_seconds must be a number, got {timeout_seconds!r}")
        if timeout_seconds != timeout_seconds:
            raise ValueError(f"wait() timeout_seconds must be a number of seconds, got "
                             f"{timeout_seconds!r}")
        # inf waits "forever": as long as a thread wait can be told to.
        seconds = min(max(0.0, float(timeout_seconds)), threading.TIMEOUT_MAX / 2)
        deadline = time.monotonic() + seconds
        creation = self._creation
        if creation is not None:
            # Answered once the node committed the creation, with the group
            # as committed: CREATED right away in the common case.
            try:
                reply = creation.result(max(0.0, deadline - time.monotonic()))
            except concurrent.futures.TimeoutError:
                return False
            self._creation = None
            record = reply.get("record") if isinstance(reply, dict) else None
            if record and record.get("state") == CREATED:
                return True
        interval = _WAIT_POLL_MIN_S
        while True:
            remaining = deadline - time.monotonic()
            try:
                record = _record_of_with_timeout(self.id, max(0.5, min(remaining, 10.0)))
            except _RequestTimedOut:
                record = None
            else:
                if record is None or record.state == REMOVED:
                    return False
                if record.state == CREATED:
                    if self.bundle_cache is None:
                        self.bundle_cache = [dict(b) for b in record.bundles]
                    return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(interval, remaining))
            interval = min(interval * 2, _WAIT_POLL_MAX_S)

    @property
    def bundle_specs(self) -> List[Dict[str, float]]:
        self._fill_bundle_cache()
        return [dict(b) for b in self.bundle_cache]

    @property
    def bundle_count(self) -> int:
        self._fill_bundle_cache()
        return len(self.bundle_cache)

    def _fill_bundle_cache(self) -> None:
        if self.bundle_cache is not None:
            return
        if self.is_empty:
            self.bundle_cache = []
            return
        record = _record_of(self.id)
        if record is None:
            raise ValueError(f"placement group {self.id.hex()} does not exist (it was removed "
                             f"or never created)")
        self.bundle_cache = [dict(b) for b in record.bundles]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PlacementGroup):
            return NotImplemented
        return self.id == other.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __reduce__(self):
        return (PlacementGroup, (self.id, self.bundle_cache))

    def __repr__(self) -> str:
        return f"PlacementGroup(id={self.id.hex()}, bundles={self.bundle_cache!r})"


class _RequestTimedOut(Exception):
    pass


def _record_of_with_timeout(pg_id: PlacementGroupID, timeout: float):
    from meshray.exceptions import GetTimeoutError
    try:
        reply = _request("pg_get", {"pg_id": pg_id.hex()}, timeout=timeout)
    except GetTimeoutError:
        raise _RequestTimedOut() from None
    data = reply.get("record")
    return PlacementGroupRecord.from_dict(data) if data else None


# --------------------------------------------------------------------------
# Functions


def placement_group(bundles: List[Dict[str, float]], strategy: str = "PACK", name: str = "",
                    lifetime: Optional[str] = None, _soft_target_node_id: Optional[str] = None,
                    bundle_label_selector: Optional[List[Dict[str, str]]] = None
                    ) -> PlacementGroup:
    """Create a placement group; returns at once, reservation may follow.

    Strategies: PACK (fewest nodes), SPREAD (distinct nodes, best effort),
    STRICT_PACK (one node), STRICT_SPREAD (one node per bundle). ``lifetime``
    None ties the group to the creating job; "detached" keeps it until
    removed. A ``name`` is unique within the current namespace. Bad
    arguments raise ValueError before anything is sent.
    """
    spec = validate_placement_group_args(bundles, strategy, name, lifetime)
    if _soft_target_node_id is not None:
        raise ValueError("placement_group(_soft_target_node_id=...) is not supported by meshray")
    if bundle_label_selector is not None:
        raise ValueError("placement_group(bundle_label_selector=...) is not supported by meshray")
    core = _core()
    job_hex, namespace = _job_and_namespace(core)
    pg_id = PlacementGroupID.for_node(getattr(core, "node_id", b"") or b"")
    payload = spec.to_payload()
    payload.update({"pg_id": pg_id.hex(), "namespace": namespace, "job_id": job_hex})
    if spec.name:
        # Wait: a name another live group holds must raise here, as in Ray.
        creation: concurrent.futures.Future = concurrent.futures.Future()
        creation.set_result(_request("pg_create", payload))
    else:
        creation = _send("pg_create", payload)
        creation.add_done_callback(_log_failure(f"creating placement group {pg_id.hex()}"))
    group = PlacementGroup(pg_id, list(spec.bundles))
    group._creation = creation
    return group


def remove_placement_group(placement_group: PlacementGroup) -> None:
    """Asynchronously remove the group and free its reservations (as in Ray:
    the call returns once the request is sent; reads made afterwards see the
    group removed). Tasks and actors still using it fail
    (TaskPlacementGroupRemoved / ActorPlacementGroupRemoved). Removing a
    group twice is harmless."""
    if not isinstance(placement_group, PlacementGroup):
        raise TypeError(f"remove_placement_group() expects a PlacementGroup, got "
                        f"{type(placement_group).__name__}")
    if placement_group.is_empty:
        raise ValueError("remove_placement_group() cannot remove the empty placement group")
    placement_group._creation = None
    pg_hex = placement_group.id.hex()
    _send("pg_remove", {"pg_id": pg_hex}).add_done_callback(
        _log_failure(f"removing placement group {pg_hex}"))


def get_placement_group(placement_group_name: str) -> PlacementGroup:
    """The live group named ``placement_group_name`` in the current namespace."""
    if not isinstance(placement_group_name, str) or not placement_group_name:
        raise ValueError("Please supply a non-empty str name to get_placement_group")
    core = _core()
    _job, namespace = _job_and_namespace(core)
    reply = _request("pg_get_by_name", {"name": placement_group_name, "namespace": namespace})
    data = reply.get("record")
    if not data:
        raise ValueError(f"Failed to look up placement group with name: "
                         f"{placement_group_name!r} in namespace {namespace!r}")
    record = PlacementGroupRecord.from_dict(data)
    return PlacementGroup(PlacementGroupID.from_hex(record.pg_id), list(record.bundles))


def placement_group_table(placement_group: Optional[PlacementGroup] = None) -> dict:
    """State of one group (``{}`` if unknown), or of all groups keyed by id.

    Keys per group: placement_group_id, name, namespace, bundles,
    bundles_to_node_id, strategy, state (PENDING, CREATED, RESCHEDULING,
    REMOVED), is_detached, creator_job_id, stats.
    """
    if placement_group is not None:
        if not isinstance(placement_group, PlacementGroup):
            raise TypeError(f"placement_group_table() expects a PlacementGroup or None, got "
                            f"{type(placement_group).__name__}")
        record = _record_of(placement_group.id)
        return table_entry(record) if record is not None else {}
    reply = _request("pg_table", {})
    out = {}
    for data in reply.get("records", []):
        record = PlacementGroupRecord.from_dict(data)
        out[record.pg_id] = table_entry(record)
    return out


def get_current_placement_group() -> Optional[PlacementGroup]:
    """The group the running task or actor was scheduled into, else None
    (always None in a driver)."""
    group = state_mod.current_placement_group()
    return group if isinstance(group, PlacementGroup) else None
