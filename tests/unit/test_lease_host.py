"""A worker runs pushed tasks only under the lease its node told it of
(core/lease_host.py), over a real call link with the membership handshake.

No node or executor: the test plays the node (``on_lease``) and records what
the host hands its executor.
"""
from __future__ import annotations

import pickle
import threading
from types import SimpleNamespace

import pytest

from meshray.core import lease_host
from meshray.core.lease_host import LeaseHost
from meshray.rpc import call_link
from meshray.rpc.call_link import LinkClosed
from meshray.rpc.generated import meshray_pb2 as pb
from tests.helpers import wait_for

TOKEN = "lease-host-test-secret-0123456789abcdef"
LEASE = b"L" * 16


class _Executor:
    def __init__(self):
        self.core = SimpleNamespace(send_actor_task_events=lambda report: None)
        self.pushed, self.cancelled = [], []
        self.arrived = threading.Event()

    def enqueue_leased(self, spec, reply):
        self.pushed.append(spec.task_id)
        self.arrived.set()

    def cancel(self, task_id):
        self.cancelled.append(task_id)


def _batch(lease_id: bytes, task_id: bytes = b"t" * 16) -> bytes:
    spec = pb.TaskSpec(task_id=task_id, function_id=b"f" * 16, num_returns=1,
                       args_blob=pickle.dumps(((), {})))
    return pb.ActorCallBatch(calls=[spec], lease_id=lease_id, functions=[pb.RegisterFunction(
        function_id=b"f" * 16, pickled=pickle.dumps(len))]).SerializeToString()


@pytest.fixture
def host(tmp_path, monkeypatch):
    monkeypatch.setattr(lease_host, "LEASE_KNOWN_WAIT_S", 0.2)
    executor = _Executor()
    served = LeaseHost(executor, session_dir=str(tmp_path), worker_id=b"w" * 16, token=TOKEN)
    yield served, executor
    served.close()


def test_a_batch_under_a_lease_the_node_never_granted_is_refused_and_runs_nothing(host):
    served, executor = host
    link = call_link.connect(served.address, token=TOKEN, tls=None)
    try:
        link.send(call_link.CALLS, _batch(LEASE))
        with pytest.raises(LinkClosed) as ended:
            link.recv_reply()
        assert ended.value.refused and "not leased" in ended.value.details
    finally:
        link.close()
    assert executor.pushed == []


def test_a_batch_under_the_granted_lease_runs_and_an_ended_lease_refuses_again(host):
    served, executor = host
    served.on_lease(pb.LeaseChange(lease_id=LEASE, holder_id=b"h" * 16, granted=True))
    link = call_link.connect(served.address, token=TOKEN, tls=None)
    try:
        link.send(call_link.CALLS, _batch(LEASE))
        assert executor.arrived.wait(10) and executor.pushed == [b"t" * 16]
        link.send(call_link.CALLS, pb.ActorCallBatch(
            lease_id=LEASE, cancel_task_ids=[b"t" * 16]).SerializeToString())
        wait_for(lambda: executor.cancelled, message="the cancel reached the executor")
    finally:
        link.close()
    served.on_lease(pb.LeaseChange(lease_id=LEASE, granted=False))
    link = call_link.connect(served.address, token=TOKEN, tls=None)
    try:
        link.send(call_link.CALLS, _batch(LEASE, b"u" * 16))
        with pytest.raises(LinkClosed) as ended:
            link.recv_reply()
        assert ended.value.refused
    finally:
        link.close()
    assert executor.pushed == [b"t" * 16] and executor.cancelled == [b"t" * 16]


def test_a_malformed_batch_ends_the_link_with_invalid_argument(host):
    served, executor = host
    link = call_link.connect(served.address, token=TOKEN, tls=None)
    try:
        link.send(call_link.CALLS, _batch(b"short"))
        with pytest.raises(LinkClosed) as ended:
            link.recv_reply()
        assert ended.value.code == call_link.MALFORMED and "lease_id" in ended.value.details
    finally:
        link.close()
    assert executor.pushed == []
