"""A node's object transfers (node/transfer.py), holder side, with a stand-in node.

ObjectTransfer keeps the node's store, directory, view and metrics and asks
the node's peer duties to send; here those are in-memory stand-ins, so the
tests check what it serves and whom it tells: a pull streams the file's
bytes and remembers the puller, whose copy is freed with the object (once);
an object not here is refused NOT_FOUND; a local object is restored without
pulling.
"""
from __future__ import annotations

import asyncio
import pickle
from types import SimpleNamespace

import grpc
import pytest

from meshray import exceptions
from meshray.node.cluster_view import ClusterView
from meshray.node.objects import ObjectDirectory
from meshray.node.state import NodeState
from meshray.node.tasks import TaskQueue
from meshray.node.transfer import PULLER_METADATA_KEY, ObjectTransfer, decode_chunk
from meshray.object_store.layout import write_object
from meshray.rpc.generated import meshray_pb2 as pb
from meshray.scheduler.resources import NodeResources

HERE, PEER = "aa" * 28, "bb" * 28
OID = b"\x05" * 20


class _Store:
    def __init__(self, files: dict):
        self.files = files

    def contains(self, object_id):
        return object_id in self.files

    def ensure_in_memory(self, object_id):
        return self.files[object_id]


class _Aborted(Exception):
    pass


class _Context:
    def __init__(self, puller: str):
        self.puller = puller

    def invocation_metadata(self):
        return ((PULLER_METADATA_KEY, self.puller),)

    async def abort(self, code, details):
        raise _Aborted(code, details)


def _transfer(files: dict):
    sent = []
    objects = ObjectDirectory()
    machine = NodeState(resources=NodeResources({"CPU": 1.0}), queue=TaskQueue(), bundles=None,
                        objects=objects)
    node = SimpleNamespace(store=_Store(files), objects=objects,
                           dispatch=SimpleNamespace(handle=machine.handle),
                           node_hex=HERE, membership=None,
                           metrics=SimpleNamespace(bytes_sent=0, bytes_received=0),
                           peers=SimpleNamespace(view=ClusterView(HERE), send=lambda node_hex,
                                                 event: sent.append((node_hex, event))))
    return ObjectTransfer(node), node, sent


async def _pull(transfer, object_id, puller=PEER, chunk_size=1000):
    request = pb.PullRequest(object_id=object_id, chunk_size=chunk_size)
    return [decode_chunk(c) async for c in transfer.serve_pull(request, _Context(puller))]


def _object_file(tmp_path) -> str:
    path = str(tmp_path / "obj")
    write_object(path, b"inband", [bytes(range(256)) * 10])
    return path


def test_a_served_pull_streams_the_file_and_its_copy_is_freed_with_the_object(tmp_path):
    path = _object_file(tmp_path)
    with open(path, "rb") as f:
        data = f.read()
    transfer, node, sent = _transfer({OID: str(path)})
    chunks = asyncio.run(_pull(transfer, OID))
    assert b"".join(bytes(c[1]) for c in chunks) == data
    assert [c[0] for c in chunks] == list(range(0, len(data), 1000))
    assert {c[2] for c in chunks} == {len(data)}
    assert node.metrics.bytes_sent == len(data)

    transfer.copies_freed(OID)
    [(to, event)] = sent
    assert to == PEER and list(event.free.object_ids) == [OID]
    transfer.copies_freed(OID)               # told once
    assert len(sent) == 1


def test_a_pull_by_this_node_itself_is_not_remembered(tmp_path):
    transfer, _node, sent = _transfer({OID: _object_file(tmp_path)})
    asyncio.run(_pull(transfer, OID, puller=HERE))
    transfer.copies_freed(OID)
    assert sent == []


def test_a_pull_of_an_object_not_here_is_refused_not_found():
    transfer, _node, _sent = _transfer({})
    with pytest.raises(_Aborted) as info:
        asyncio.run(_pull(transfer, OID))
    code, details = info.value.args
    assert code == grpc.StatusCode.NOT_FOUND and OID.hex() in details and HERE in details


def test_a_local_object_is_restored_without_pulling(tmp_path):
    transfer, _node, sent = _transfer({OID: str(tmp_path / "obj")})
    reply = asyncio.run(transfer.ask_restore(None, {"object_id": OID.hex()}))
    assert reply == {"path": str(tmp_path / "obj")} and sent == []


def test_a_reader_waiting_for_a_value_is_woken_when_it_is_ready():
    transfer, node, _sent = _transfer({})
    value = pb.ObjectValue(object_id=OID, inline_data=pickle.dumps(b"package bytes"))

    async def main():
        node.objects.expect(OID, 1)
        waiting = asyncio.get_running_loop().create_task(transfer.object_bytes(OID))
        await asyncio.sleep(0)
        node.objects.set_value(OID, value)
        transfer.object_ready(OID)
        return await asyncio.wait_for(waiting, 5)

    node.peers.flush_borrows = lambda: None
    assert asyncio.run(main()) == b"package bytes"


def test_a_pull_that_fails_because_the_object_was_made_here_meanwhile_gives_that_copy(tmp_path):
    """A rebuild on this node can seal the object under the pull's own
    reservation; the pull then fails, and its readers get the local copy
    instead of the pull's error (seen in a long chaos run)."""
    transfer, node, _sent = _transfer({})
    path = str(tmp_path / "obj")

    async def pull_fails_after_a_local_seal(object_id, location, size=0):
        node.store.files[object_id] = path
        raise ConnectionError("the pull's seal found the object already sealed")

    transfer._pull_any = pull_fails_after_a_local_seal
    reply = asyncio.run(transfer.ask_restore(None, {"object_id": OID.hex(), "location": PEER}))
    assert reply == {"path": path}


def test_a_pull_that_fails_with_no_copy_here_reports_its_error():
    transfer, _node, _sent = _transfer({})

    async def pull_fails(object_id, location, size=0):
        raise exceptions.ObjectLostError(object_id.hex(), call_site="test: every copy died")

    transfer._pull_any = pull_fails
    reply = asyncio.run(transfer.ask_restore(None, {"object_id": OID.hex(), "location": PEER}))
    assert "error_value" in reply


def test_a_failed_pulls_reservation_is_kept_when_another_creator_sealed_it():
    from meshray.object_store.store import ObjectStateError
    transfer, node, _sent = _transfer({})
    aborted = []

    def abort(object_id):
        aborted.append(object_id)
        raise ObjectStateError(f"cannot abort object {object_id.hex()}: it is already sealed")

    node.store.abort = abort
    transfer._drop_reservation(OID)          # does not raise: the sealed copy stays
    assert aborted == [OID]
