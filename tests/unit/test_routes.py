"""The node's dispatch tables and its one error protocol for questions."""
import asyncio
import json

import pytest

from meshray.common import ids
from meshray.node.daemon import NodeConfig, NodeDaemon
from meshray.node.routes import Routes, answer
from meshray.rpc.dispatch import dispatch_table, event_kinds
from meshray.rpc.generated import meshray_pb2 as pb


def _all(message_type, handler=lambda *a: None):
    return {kind: handler for kind in event_kinds(message_type)}


def test_a_table_missing_a_kind_is_refused_when_built():
    table = _all(pb.ClientEvent)
    del table["submit"]
    with pytest.raises(ValueError, match=r"no handler for \['submit'\]"):
        dispatch_table(pb.ClientEvent, table)


def test_a_handler_for_no_kind_is_refused_when_built():
    table = {**_all(pb.PeerEvent), "spil": lambda *a: None}
    with pytest.raises(ValueError, match=r"unknown kinds \['spil'\]"):
        dispatch_table(pb.PeerEvent, table)


def test_the_daemon_routes_every_kind_and_question(tmp_path):
    daemon = NodeDaemon(NodeConfig(session_dir=str(tmp_path), node_id=ids.new_id(),
                                   resources={"CPU": 1.0}, object_store_memory=1 << 20))
    try:
        routes = daemon.routes
        assert set(routes.client) == event_kinds(pb.ClientEvent)
        assert set(routes.peer) == event_kinds(pb.PeerEvent)
        # Answered from the etcd view: local drivers only, not peers.
        assert "nodes" in routes.questions and "nodes" not in routes.peer_questions
        assert "dump_events" in routes.peer_questions
        # Only what the table names is reachable: a method that merely
        # exists on the daemon is not a question.
        assert "_answer_cluster" not in routes.questions
    finally:
        daemon.store.destroy()


def _routes():
    async def echo(conn, payload):
        return {"conn": conn, "got": payload}

    async def broken(conn, payload):
        raise KeyError("no such thing")

    async def local(conn, payload):
        return "local"

    return Routes.build(client=_all(pb.ClientEvent), peer=_all(pb.PeerEvent),
                        questions={"echo": echo, "broken": broken, "local": local},
                        local_only=frozenset({"local"}))


def _ask(method, payload=b"", *, from_peer=False):
    msg = pb.Request(request_id=7, method=method, payload=payload)
    return asyncio.run(answer(_routes(), "c1", msg, from_peer=from_peer))


def test_an_answer_carries_the_json_result_and_the_request_id():
    reply = _ask("echo", json.dumps({"x": 1}).encode())
    assert reply.request_id == 7 and not reply.error
    assert json.loads(reply.payload) == {"conn": "c1", "got": {"x": 1}}


def test_a_failing_asker_is_answered_with_its_error_type_and_text():
    reply = _ask("broken")
    assert reply.request_id == 7 and reply.error == "KeyError: 'no such thing'"


def test_an_unknown_method_is_answered_with_an_error_naming_it():
    assert _ask("nope").error == "ValueError: unknown request method 'nope'"


def test_a_peer_may_not_ask_a_local_only_question():
    assert _ask("local").payload == b'"local"'
    assert _ask("local", from_peer=True).error == "ValueError: unknown request method 'local'"


def test_undecodable_payload_is_answered_not_dropped():
    assert _ask("echo", b"{not json").error.startswith("JSONDecodeError")


def test_local_only_questions_must_have_askers():
    with pytest.raises(ValueError, match="local-only questions without an asker"):
        Routes.build(client=_all(pb.ClientEvent), peer=_all(pb.PeerEvent), questions={},
                     local_only=frozenset({"nodes"}))
