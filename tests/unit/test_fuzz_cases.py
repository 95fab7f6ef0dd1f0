"""The wire fuzzer's cases, checked without a cluster.

What the fuzzer calls garbage must be garbage by the same rules the servers
apply, and its valid templates must pass them: otherwise a fuzz run could
pass because the fuzzer sent the wrong thing, not because the servers
answered right.
"""
from __future__ import annotations

import collections
import random

import pytest

from meshray.core import call_rules
from meshray.node import request_rules as node_rules
from meshray.rpc import strict
from meshray.rpc.generated import meshray_pb2 as pb
from meshray.testing import fuzz_cases as fc
from meshray.testing.fuzz import CaseMaker, Target, judge

NODE = bytes(range(16))
ACTOR = NODE[:6] + bytes(range(100, 110))
METHODS = fc.wire_methods()
QUESTIONS = frozenset({"actor_info", "restore", "store_stats"})
CHECKS = {
    "/meshray.NodeSession/Connect": lambda b: node_rules.check_client_batch(
        b, QUESTIONS | node_rules.CLUSTER_QUESTIONS),
    "/meshray.NodePeer/Deliver": lambda b: node_rules.check_peer_batch(b, QUESTIONS),
    "/meshray.NodePeer/PullObject": node_rules.check_pull_request,
    "/meshray.ActorService/Call": lambda b: call_rules.check_actor_call_batch(
        b, ACTOR, {"echo", "__ray_ready__", "__ray_terminate__"}),
}
CLASSES = {m.path: m.request_class for m in METHODS}


def _targets():
    node = Target("node", ["n"], fc.Context(node_id=NODE, actor_id=ACTOR),
                  methods=[m for m in METHODS if m.service != "meshray.ActorService"])
    actor = Target("actor", ["a"], fc.Context(node_id=NODE, actor_id=ACTOR,
                                              actor_methods=("echo",)),
                   methods=[m for m in METHODS if m.service == "meshray.ActorService"])
    return [node, actor]


def _server_view(case):
    """What the server's strict decoding and rules say: None (accepted) or the refusal."""
    try:
        message = strict.decode(CLASSES[case.method], case.messages[0])
        CHECKS[case.method](message)
    except strict.Malformed as exc:
        return f"{CLASSES[case.method].DESCRIPTOR.full_name}.{exc}"
    return None


def test_methods_come_from_the_descriptors():
    paths = {m.path for m in METHODS}
    for service in pb.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            assert f"/{service.full_name}/{method.name}" in paths


@pytest.mark.parametrize("seed", [1, 2])
def test_semantic_garbage_is_refused_naming_the_field(seed):
    maker = CaseMaker(seed, _targets())
    seen = collections.Counter()
    for index in range(1500):
        case = maker.make(index)
        if case.kind != "semantic":
            continue
        seen[case.method] += 1
        refusal = _server_view(case)
        if refusal is None:
            # Only what a handler or a running call judges passes the rules:
            # an unknown worker, someone else's actor, arguments that load wrong.
            assert set(case.names) & {"worker_id", "actor_exiting", "args_blob"}, \
                case.describe()
            continue
        missing = [name for name in case.names if name not in refusal]
        assert not missing, f"{case.describe()}: {refusal}"
    assert set(seen) == set(CHECKS), seen


def test_templates_pass_and_wire_garbage_fails_the_rules():
    maker = CaseMaker(3, _targets())
    kinds = collections.Counter()
    for index in range(1500):
        case = maker.make(index)
        if case.method not in CHECKS or len(case.messages) != 1:
            continue
        refusal = _server_view(case)
        if case.expect == fc.ACCEPTED:
            assert refusal is None, f"{case.describe()}: {refusal}"
        elif case.kind in ("random_bytes", "truncated", "mutated", "wrong_wire_type",
                           "unknown_field", "huge_length") and case.expect == fc.INVALID:
            assert refusal is not None and case.names[0] in refusal, case.describe()
        kinds[case.kind] += 1
    assert set(kinds) >= {"template", "random_bytes", "truncated", "mutated", "wrong_wire_type",
                          "unknown_field", "huge_length"}


def test_cases_reproduce_from_seed_and_index():
    first = [CaseMaker(9, _targets()).make(i) for i in (5, 77, 400)]
    again = [CaseMaker(9, _targets()).make(i) for i in (400, 77, 5)][::-1]
    assert [(c.method, c.kind, c.messages) for c in first] == \
        [(c.method, c.kind, c.messages) for c in again]


def test_judge():
    garbage = fc.Case(1, "random_bytes", "node", "/m", "unary_unary", [b"x"], fc.INVALID,
                      ("meshray.ClientBatch",))
    assert judge(garbage, "OK", "", 10) is not None
    assert judge(garbage, "INVALID_ARGUMENT", "meshray.ClientBatch: 1 bytes", 10) is None
    assert "does not name" in judge(garbage, "INVALID_ARGUMENT", "something else", 10)
    assert "hang" in judge(garbage, "DEADLINE_EXCEEDED", "", 10)
    clear = fc.Case(1, "random_valid", "node", "/m", "unary_unary", [b""], fc.CLEAR)
    assert judge(clear, "OK", "", 10) is None and judge(clear, "NOT_FOUND", "", 10) is None
    assert judge(clear, "UNKNOWN", "Exception calling application", 10) is not None
    assert judge(clear, "INTERNAL", "", 10) is not None
    rng = random.Random(0)
    assert fc.wire_garbage(pb.ClientBatch, bytes(rng.getrandbits(8) for _ in range(64)))
