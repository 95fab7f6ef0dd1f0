"""Which handler takes which message: the node's dispatch tables, written out.

Three kinds of message reach a node: events on a local session stream
(`ClientEvent`, from drivers and workers), events from peers (`PeerEvent`),
and questions (`Request`, JSON in and out) that both may ask. Each kind has
one table, built once when the daemon starts, from a message kind or method
name to the bound handler. The alternative — building a method name from the
message (`getattr(self, "_on_" + kind)`) — hides which messages a node
answers, lets any method with a matching prefix become reachable from the
wire, and fails only when such a message arrives. The event tables are
checked when built (rpc/dispatch.py): every kind of the `oneof` has exactly
one handler.

Questions have one error protocol, wherever they come from: an answer is a
`Reply` with a JSON payload, or with `error` set to "<ExceptionType>: <text>";
a question is never left unanswered. (A *malformed* message is a different
matter, refused before any table is consulted: rpc/strict.py answers it
INVALID_ARGUMENT, node/request_rules.py says what is malformed.)
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Awaitable, Callable, Mapping

from meshray.node import request_rules
from meshray.node.lease_service import LEASE_QUESTIONS
from meshray.rpc.dispatch import dispatch_table
from meshray.rpc.generated import meshray_pb2 as pb

__all__ = ["Routes", "answer", "node_routes"]

Handler = Callable[..., None]
Asker = Callable[..., Awaitable[object]]


@dataclass(frozen=True)
class Routes:
    """The node's three dispatch tables (see the module docstring)."""

    client: dict            # ClientEvent kind -> handler(conn, message)
    peer: dict              # PeerEvent kind -> handler(from_node_hex, message)
    questions: dict         # Request method -> async asker(conn, payload) -> JSON-able
    peer_questions: frozenset   # the methods a peer may ask (a subset of questions)

    @classmethod
    def build(cls, *, client: Mapping[str, Handler], peer: Mapping[str, Handler],
              questions: Mapping[str, Asker], local_only: frozenset = frozenset()) -> "Routes":
        """Check and freeze the tables; `local_only` questions are not answered to peers."""
        if not local_only <= set(questions):
            raise ValueError(f"local-only questions without an asker: "
                             f"{sorted(local_only - set(questions))}")
        return cls(client=dispatch_table(pb.ClientEvent, client),
                   peer=dispatch_table(pb.PeerEvent, peer),
                   questions=dict(questions),
                   peer_questions=frozenset(questions) - local_only)


async def answer(routes: Routes, conn, msg: pb.Request, *, from_peer: bool = False) -> pb.Reply:
    """Answer one question: a Reply with the JSON result, or with the error."""
    try:
        methods = routes.peer_questions if from_peer else routes.questions
        if msg.method not in methods:
            raise ValueError(f"unknown request method {msg.method!r}")
        payload = json.loads(msg.payload) if msg.payload else {}
        result = await routes.questions[msg.method](conn, payload)
        return pb.Reply(request_id=msg.request_id, payload=json.dumps(result).encode())
    except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 - always answered
        return pb.Reply(request_id=msg.request_id, error=f"{type(exc).__name__}: {exc}")


def node_routes(node) -> Routes:
    """The daemon's tables: every message kind and question, and who takes it."""
    cluster_questions = {method: node._cluster_asker(method)
                         for method in request_rules.CLUSTER_QUESTIONS}
    return Routes.build(
        client={
            "hello": node._on_hello, "register_function": node._on_register_function,
            "submit": node._on_submit, "put": node._on_put, "reserve": node._on_reserve,
            "subscribe": node._on_subscribe, "refs": node._on_refs,
            "task_result": node._on_task_result, "cancel": node._on_cancel,
            "blocked": node._on_blocked, "request": node._on_request,
            "actor_exiting": node.hosting.on_actor_exiting,
            "task_events": node.hosting.on_task_events,
            "metrics": node.metrics.on_report,
            "leased_task": node.leases.on_leased_task,
        },
        peer={
            "spill": node.peers.on_spill, "verdict": node.peers.on_verdict,
            "result": node.peers.on_result, "subscribe": node.peers.on_subscribe,
            "ready": node.peers.on_ready, "refs": node.peers.on_refs,
            "request": node.peers.on_request, "reply": node.peers.on_reply,
            "free": node.peers.on_free, "cancel_remote": node.peers.on_cancel_remote,
            "container_freed": node.peers.on_container_freed,
            "logs": node.log_streams.on_peer_logs,
        },
        questions={
            "dump_events": node._ask_dump_events, "store_stats": node._ask_store_stats,
            "flush_output": node._ask_flush_output,
            "restore": node.transfer.ask_restore, "rebuild_object": node.transfer.ask_rebuild_object,
            "pg_create": node.placement.ask_create, "pg_remove": node.placement.ask_remove,
            "pg_get": node.placement.ask_get, "pg_get_by_name": node.placement.ask_get_by_name,
            "pg_table": node.placement.ask_table, "actor_info": node.hosting.ask_actor_info,
            "kill_actor": node.hosting.ask_kill_actor, "list_actors": node.hosting.ask_list_actors,
            "claim_actor_name": node.hosting.ask_claim_actor_name,
            "get_named_actor": node.hosting.ask_get_named_actor,
            "state_local": node.state.ask_local, "state_query": node.state.ask_cluster,
            "list_logs": node.logs.ask_list, "get_log": node.logs.ask_get,
            **node.jobs.questions(), **node.leases.questions(), **cluster_questions,
        },
        local_only=frozenset(cluster_questions) | {"state_query", "flush_output"}
        | LEASE_QUESTIONS
        | set(node.jobs.questions()))
