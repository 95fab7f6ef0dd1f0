"""Records in etcd that no member wrote are refused, and nobody at an address
read from etcd learns the cluster secret or gets an answer read.

The attacks are the ones hostile testing found: someone who could write etcd
published a node record with their own address (the real daemon spilled work
to it and handed it the token; with 1,000 advertised CPUs most tasks went
there and hung), and a named-actor record pointing at their server (the
driver dialled it, sent the token and unpickled the reply). Here the
attacker writes with a Coordinator that has etcd access but not the cluster
secret, and runs a gRPC server that accepts anything and records it.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent import futures

import grpc
import pytest

from meshray import security
from meshray.coordination import keyspace
from meshray.coordination.client import Coordinator
from tests.helpers import wait_for

TOKEN = security.generate_token()
FAKE_NODE = "f" * 56
FAKE_ACTOR = "e" * 32

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.meshray_init(num_cpus=1, _token=TOKEN, log_to_driver=False)]


class Impostor(grpc.GenericRpcHandler):
    """Accepts every method and records it: what an attacker's server sees."""

    def __init__(self):
        self.seen: list[tuple[str, list]] = []
        self.lock = threading.Lock()

    def service(self, details):
        with self.lock:
            self.seen.append((details.method, list(details.invocation_metadata)))
        return grpc.stream_stream_rpc_method_handler(lambda requests, context: iter(()))


@pytest.fixture(scope="module")
def impostor():
    handler = Impostor()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", handler
    server.stop(0)


def _attacker(node) -> Coordinator:
    """etcd access without the cluster secret (whatever etcd itself demands)."""
    options = security.etcd_client_options(token=TOKEN)
    options.pop("record_key")
    return Coordinator(node.etcd.split(","), timeout=5.0, **options)


def _node_log(node) -> str:
    with open(os.path.join(node.session_dir, "node.log"), errors="replace") as handle:
        return handle.read()


def _assert_secret_never_sent(handler: Impostor) -> None:
    for _method, metadata in handler.seen:
        for _key, value in metadata:
            assert TOKEN not in str(value)


def test_forged_node_record_is_refused_and_gets_no_work(ray, local_node, impostor):
    meshray, node = ray, local_node
    address, handler = impostor
    keys = keyspace.Keyspace()
    attacker = _attacker(node)
    member = Coordinator(node.etcd.split(","), timeout=5.0,
                         **security.etcd_client_options(token=TOKEN))
    try:
        real = wait_for(lambda: member.get(keys.node(node.node_id))[0], timeout=20,
                        message="the node's own record is in etcd")
        record = keyspace.decode_json(real)
        record.update(NodeID=FAKE_NODE, Address=address)
        record["Resources"] = {"CPU": 1000.0}
        lease = attacker.grant_lease(60)
        attacker.put(keys.node(FAKE_NODE), keyspace.encode_json(record), lease=lease)
        attacker.put(keys.avail(FAKE_NODE), keyspace.encode_json({"CPU": 1000.0}), lease=lease)
        wait_for(lambda: f"refused etcd record {keys.node(FAKE_NODE)}" in _node_log(node),
                 timeout=20, message="the node logs the forged node record by its key")
        # The member's own reads see no such node either.
        assert member.get(keys.node(FAKE_NODE))[0] is None

        @meshray.remote(num_cpus=1)
        def where(i):
            time.sleep(0.01)
            return i

        assert meshray.get([where.remote(i) for i in range(40)], timeout=60) == list(range(40))
        assert FAKE_NODE not in {n["NodeID"] for n in meshray.nodes()}
        assert handler.seen == []
        attacker.revoke_lease(lease)
    finally:
        attacker.close()
        member.close()


def test_forged_named_actor_record_is_not_dialled(ray, local_node, impostor):
    meshray, node = ray, local_node
    address, handler = impostor
    keys = keyspace.Keyspace()
    attacker = _attacker(node)
    try:
        attacker.put(keys.actor_name("", "svc"), FAKE_ACTOR.encode())
        attacker.put(keys.actor(FAKE_ACTOR), keyspace.encode_json({
            "actor_id": FAKE_ACTOR, "state": "ALIVE", "node_id": FAKE_NODE, "address": address,
            "num_restarts": 0, "death_cause": None, "name": "svc", "namespace": "",
            "class_name": "Svc", "methods": {}, "is_async": False, "max_task_retries": 0,
            "max_restarts": 0, "detached": True, "owner_id": "", "job_id": "", "pid": 1}))
        with pytest.raises(ValueError):
            meshray.get_actor("svc", namespace="")
        wait_for(lambda: f"refused etcd record {keys.actor_name('', 'svc')}" in _node_log(node),
                 timeout=10, message="the node logs the forged name record by its key")
        assert handler.seen == []
        _assert_secret_never_sent(handler)
    finally:
        attacker.delete(keys.actor_name("", "svc"))
        attacker.delete(keys.actor(FAKE_ACTOR))
        attacker.close()


# ------------------------------------------------ the seal at the Coordinator
def test_sealed_values_round_trip_and_forgeries_read_as_absent(etcd):
    from meshray.coordination.client import Put, ValueEquals

    key = security.derive_key(TOKEN, "records")
    member = Coordinator([etcd.endpoint], timeout=5.0, record_key=key)
    outsider = Coordinator([etcd.endpoint], timeout=5.0)
    seen = []
    watch = member.watch_prefix("/seal/", member.get_prefix("/seal/")[1] + 1,
                                lambda events: seen.extend(events))
    try:
        member.put("/seal/a", b'{"x":1}')
        assert member.get("/seal/a")[0] == b'{"x":1}'
        assert outsider.get("/seal/a")[0] != b'{"x":1}'   # sealed on the wire
        # A compare on a value is sealed the same way, so it still matches.
        assert member.txn([ValueEquals("/seal/a", b'{"x":1}')], [Put("/seal/a", b'{"x":2}')]).succeeded
        assert member.get("/seal/a")[0] == b'{"x":2}'
        # A record copied to another key does not count there.
        outsider.put("/seal/b", outsider.get("/seal/a")[0])
        assert member.get("/seal/b")[0] is None
        # An unsealed write over a member's record leaves no record.
        outsider.put("/seal/a", b'{"x":666}')
        assert member.get("/seal/a")[0] is None
        assert [item.key for item in member.get_prefix("/seal/")[0]] == []
        wait_for(lambda: [(e.kind, e.key) for e in seen][-1:] == [("delete", "/seal/a")],
                 timeout=10, message="the watch reports the forged write as the record's removal")
        assert member.seal.refused >= 3
    finally:
        watch.cancel()
        outsider.delete_prefix("/seal/")
        member.close()
        outsider.close()


def test_actor_records_reach_etcd_in_the_order_of_their_states(ray, local_node):
    """Each state change of an actor used to be written by its own thread-pool
    task, so a PENDING record could land after ALIVE and stay: callers on
    other nodes then waited for an actor that was serving. Every record must
    end up saying what the node knows."""
    meshray, node = ray, local_node
    keys = keyspace.Keyspace()

    @meshray.remote(num_cpus=0)
    class Echo:
        def ping(self):
            return "pong"

    actors = [Echo.remote() for _ in range(30)]
    assert meshray.get([a.ping.remote() for a in actors], timeout=60) == ["pong"] * 30
    member = Coordinator(node.etcd.split(","), timeout=5.0,
                         **security.etcd_client_options(token=TOKEN))
    try:
        def states():
            found = {}
            for actor in actors:
                value, _rev = member.get(keys.actor(actor._actor_id.hex()))
                found[actor._actor_id.hex()] = keyspace.decode_json(value)["state"] if value else None
            return found

        wait_for(lambda: set(states().values()) == {"ALIVE"}, timeout=20,
                 message="every live actor's record in etcd says ALIVE")
    finally:
        member.close()
        for actor in actors:
            meshray.kill(actor)
