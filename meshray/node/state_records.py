"""What a node reports about its workers, objects and jobs to the state API.

Plain functions from the node's tables to Ray's state-API records (field
names as in ``ray.util.state``: WorkerState, ObjectState, JobState); the
daemon passes them to its StateService as record sources.
"""
from __future__ import annotations

from meshray.node.state_service import StateService

__all__ = ["state_service_for", "actor_records", "job_records", "node_records", "object_records",
           "placement_group_records", "worker_records"]


def worker_records(workers, conns, node_hex: str, ip: str) -> list:
    """Every worker process of this node, and every driver connected to it."""
    records = []
    for worker in workers:
        task = worker.current_task
        lease = getattr(worker, "lease", None)
        records.append({
            "worker_id": worker.worker_id.hex(), "node_id": node_hex, "ip": ip,
            "pid": worker.pid, "is_alive": worker.process.poll() is None,
            "worker_type": "WORKER", "exit_type": None, "job_id": worker.job_hex or None,
            "actor_id": worker.actor.actor_id.hex() if worker.actor is not None else None,
            "current_task_id": task.task_id.hex() if task is not None else None,
            "state": ("BUSY" if task is not None or worker.actor is not None
                      else "LEASED" if lease is not None else "IDLE"),
            # The lease a local process pushes its tasks under (task_leases.py).
            "lease_id": lease.lease_id.hex() if lease is not None else None,
            "lease_holder_id": lease.holder_hex if lease is not None else None,
        })
    for conn in conns:
        if conn.role == "driver":
            records.append({
                "worker_id": conn.worker_id.hex(), "node_id": node_hex, "ip": ip,
                "pid": conn.pid, "is_alive": not conn.closed, "worker_type": "DRIVER",
                "exit_type": None, "job_id": conn.job_id.hex(), "actor_id": None,
                "current_task_id": None, "state": "BUSY"})
    return records


def object_records(entries, conns_by_id: dict, node_hex: str, ip: str) -> list:
    """Objects this node's directory owns or tracks, with who holds them here."""
    records = []
    for object_id, entry in entries:
        value = entry.value
        size = (value.size if value.in_store else len(value.inline_data)) if value else None
        holder = next((conns_by_id.get(h) for h in entry.holders if h in conns_by_id), None)
        records.append({
            "object_id": object_id.hex(), "object_size": size,
            "task_status": "FINISHED" if value is not None else "PENDING",
            "reference_type": ("LOCAL_REFERENCE" if entry.holders else
                               "USED_BY_PENDING_TASK" if entry.pins else "PINNED_IN_MEMORY"),
            "type": ("DRIVER" if holder is not None and holder.role == "driver" else "WORKER"),
            "pid": holder.pid if holder is not None else None, "ip": ip, "node_id": node_hex,
            "in_store": bool(value is not None and value.in_store),
            "is_error": bool(value is not None and value.is_error),
            "call_site": "disabled",
        })
    return records


def job_records(conns, node_hex: str) -> list:
    """The jobs whose driver is connected to this node."""
    return [{"job_id": conn.job_id.hex(), "status": "RUNNING", "type": "DRIVER",
             "driver_pid": conn.pid, "driver_node_id": node_hex,
             "namespace": conn.namespace, "submission_id": conn.submission_id or None}
            for conn in conns if conn.role == "driver"]


def actor_records(records) -> list:
    """Actor records as etcd holds them (node/actors.py), in Ray's ActorState fields."""
    out = []
    for record in records:
        if not isinstance(record, dict) or not isinstance(record.get("actor_id"), str):
            continue        # what etcd holds is not trusted to be well formed
        out.append({
            "actor_id": record["actor_id"], "class_name": record.get("class_name", ""),
            "state": record.get("state", ""), "job_id": record.get("job_id", ""),
            "name": record.get("name", ""), "node_id": record.get("node_id", ""),
            "pid": record.get("pid") or None, "ray_namespace": record.get("namespace", ""),
            "serialized_runtime_env": None, "required_resources": None,
            "death_cause": record.get("death_cause") or None,
            "is_detached": bool(record.get("detached")), "placement_group_id": None,
            "repr_name": "", "num_restarts": record.get("num_restarts", 0),
            "call_site": None,
        })
    return out


def node_records(nodes) -> list:
    """Membership's node records (``meshray.nodes()``) in Ray's NodeState fields."""
    out = []
    for node in nodes:
        node_id = node.get("NodeID")
        if not isinstance(node_id, str):
            continue
        ip = node.get("NodeManagerAddress", "")
        out.append({
            "node_id": node_id, "node_ip": ip, "is_head_node": False,
            "state": "ALIVE" if node.get("Alive") else "DEAD", "node_name": ip,
            "resources_total": node.get("Resources", {}), "labels": node.get("Labels", {}),
            "start_time_ms": None, "end_time_ms": None,
        })
    return out


def placement_group_records(table_entries) -> list:
    """placement_group_table() entries in Ray's PlacementGroupState fields."""
    return [{
        "placement_group_id": entry["placement_group_id"], "name": entry.get("name", ""),
        "creator_job_id": entry.get("creator_job_id", ""), "state": entry.get("state", ""),
        "bundles": [{"bundle_id": index, "node_id": entry["bundles_to_node_id"].get(index),
                     "unit_resources": bundle}
                    for index, bundle in entry.get("bundles", {}).items()],
        "is_detached": bool(entry.get("is_detached")), "stats": entry.get("stats"),
    } for entry in table_entries]


def state_service_for(node) -> StateService:
    """The daemon's StateService: each record source reads one of its tables."""
    def host() -> str:
        return node._advertised_host()

    async def actors() -> list:
        return actor_records(await node.hosting.ask_list_actors(None, {}))

    async def nodes() -> list:
        return node_records(await node._cluster_asker("nodes")(None, {}))

    async def placement_groups() -> list:
        from meshray.placement.records import PlacementGroupRecord
        from meshray.placement.records import table_entry
        reply = await node.placement.ask_table(None, {})
        return placement_group_records(
            table_entry(PlacementGroupRecord.from_dict(data)) for data in reply.get("records", []))

    return StateService(node.node_hex, {
        "tasks": node.task_events.records,
        "workers": lambda: worker_records(
            list(node.pool.by_id.values()) if node.pool else [], list(node.conns.values()),
            node.node_hex, host()),
        "objects": lambda: object_records(list(node.objects.entries()), dict(node.conns),
                                          node.node_hex, host()),
        "jobs": lambda: job_records(list(node.conns.values()), node.node_hex),
    }, cluster_sources={"actors": actors, "nodes": nodes, "placement_groups": placement_groups},
        members=node.peers.view.live_members,
        ask_peer=node.peers.ask,
        dropped=lambda resource: node.task_events.dropped if resource == "tasks" else 0,
        counted=lambda resource: ((node.task_events.counted_total,
                                   node.task_events.counted_summary())
                                  if resource == "tasks" else (0, {})))
