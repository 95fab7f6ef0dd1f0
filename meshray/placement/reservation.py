"""The etcd side of placement groups: create, reserve, re-place, remove.

There is no head node, so every operation here is written to be run by any
node, at any time, concurrently with the same operation elsewhere. Each one
reads a view, decides with the pure policy, and commits in ONE transaction
whose compares pin everything the decision read:

* the group record's mod revision (nobody placed, moved or removed it since);
* for every node that receives a bundle, its node record's mod revision (it
  is still alive, under the same lease, with the same totals) and its
  ``alloc/<node>`` mod revision (nobody reserved or freed anything there).

If any compare fails, nothing is written and the caller retries against a
fresh view. Capacity is checked against the alloc record that the compare
pins, so two creators racing for the same node serialize in etcd and the
second one sees the first one's bundles: a node's reservations can never sum
above its total, at any revision (docs/placement-groups.md has the argument;
tests/integration/test_placement_reservation.py replays etcd's history to
check it).

Functions block on etcd: the node daemon calls them off its event loop.

The code is split by operation, all re-exported here (this is the module
the daemon and the tests import):

* :mod:`.snapshot` — reading the view (Snapshot, group records) and the
  helpers every transaction shares;
* :mod:`.placing` — placing and re-placing groups, collecting garbage;
* :mod:`.creation` — creating groups, singly and in batches;
* :mod:`.removal` — removing groups, singly and in batches, per job and as
  orphans;
* this module — answering the daemon's ``pg_*`` requests.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from meshray.coordination import keyspace as ks
from meshray.coordination.client import CoordinationError
from meshray.placement import placing as _placing
from meshray.placement.creation import (
    CreateChunk,
    CreateRequest,
    PlacementGroupNameTaken,
    create_placement_group,
    create_placement_groups,
    parse_create_request,
    plan_create_chunk,
)
from meshray.placement.placing import (
    PlaceResult,
    collect_garbage,
    reschedule,
    try_place,
    try_place_pending,
)
from meshray.placement.removal import (
    DEFAULT_TOMBSTONE_TTL_S,
    RemoveChunk,
    TombstoneLeases,
    plan_remove_chunk,
    remove_job_groups,
    remove_placement_group,
    remove_placement_groups,
    sweep_orphans,
)
from meshray.placement.snapshot import (
    NodeEntry,
    Snapshot,
    get_record,
    get_record_by_name,
    list_records,
    read_snapshot,
)

__all__ = [
    "DEFAULT_TOMBSTONE_TTL_S",
    "PlacementGroupNameTaken",
    "NodeEntry",
    "Snapshot",
    "PlaceResult",
    "read_snapshot",
    "get_record",
    "get_record_by_name",
    "list_records",
    "create_placement_group",
    "try_place",
    "reschedule",
    "try_place_pending",
    "remove_placement_group",
    "remove_job_groups",
    "sweep_orphans",
    "collect_garbage",
    "CreateRequest",
    "parse_create_request",
    "CreateChunk",
    "plan_create_chunk",
    "create_placement_groups",
    "TombstoneLeases",
    "RemoveChunk",
    "plan_remove_chunk",
    "remove_placement_groups",
    "handle_request",
    "REQUEST_METHODS",
]

#: One placement round, for tests that drive it directly (not public).
_place_once = _placing._place_once


# --------------------------------------------------------------------------
# Requests from drivers and workers (answered by the node daemon)

REQUEST_METHODS = ("pg_create", "pg_remove", "pg_get", "pg_get_by_name", "pg_table")


def _error(kind: str, message: str) -> Dict[str, Any]:
    return {"error": {"type": kind, "message": message}}


def handle_request(coordinator, method: str, payload: Mapping[str, Any], *, node_id: str,
                   keys: ks.Keyspace = ks.DEFAULT, job_id: Optional[str] = None,
                   namespace: Optional[str] = None,
                   creator_node: Optional[str] = None) -> Dict[str, Any]:
    """Answer one ``pg_*`` request; the reply is JSON-ready.

    Errors the caller made (bad arguments, a taken name) come back as
    ``{"error": {"type": "ValueError", "message": ...}}`` so the public API
    can raise the right exception type; etcd trouble raises and reaches the
    caller as RaySystemError through the daemon's generic error path.
    ``job_id``/``namespace``, when the daemon passes them, override the
    payload: the daemon knows which job a connection belongs to.
    ``creator_node`` (default ``node_id``) is the node whose daemon will
    remove the group when its job ends: pass the job's driver node when the
    request comes from a worker and the driver lives elsewhere.
    """
    if method not in REQUEST_METHODS:
        raise ValueError(f"unknown placement group request {method!r}")
    try:
        if method == "pg_create":
            request = parse_create_request(payload, node_id=node_id, job_id=job_id,
                                           namespace=namespace, creator_node=creator_node)
            (outcome,) = create_placement_groups(coordinator, [request], keys=keys)
            if isinstance(outcome, Exception):
                raise outcome
            return {"record": outcome.to_dict() if outcome else None}
        if method == "pg_remove":
            removed = remove_placement_group(coordinator, str(payload.get("pg_id", "")),
                                             keys=keys)
            return {"removed": removed}
        if method == "pg_get":
            record, _ = get_record(coordinator, str(payload.get("pg_id", "")), keys)
            return {"record": record.to_dict() if record else None}
        if method == "pg_get_by_name":
            name = payload.get("name")
            ns = namespace if namespace is not None else payload.get("namespace", "")
            if not isinstance(name, str) or not name or not isinstance(ns, str):
                raise ValueError("pg_get_by_name needs a non-empty str name and a str "
                                 "namespace")
            record = get_record_by_name(coordinator, ns, name, keys)
            return {"record": record.to_dict() if record else None}
        return {"records": [r.to_dict() for r in list_records(coordinator, keys)]}
    except CoordinationError:
        raise  # some are ValueErrors too, but they are not the caller's mistake
    except ValueError as exc:
        return _error("ValueError", str(exc))
