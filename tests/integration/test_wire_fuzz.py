"""A bounded, seeded wire-fuzz run against a real node daemon and a real actor.

The fuzzer (meshray/testing/fuzz.py) holds the cluster token and sends every
method the node and the actor serve (gRPC, the node's session link, the
actor's call link) random bytes, truncated and mutated messages,
wrong wire types, unknown fields, huge lengths, one-field semantic garbage
(ids, counts, unknown "enum" strings, bad JSON, bad pickles), wrong call
shapes and unknown methods. The report holds a violation for every answer
that is not the one required (INVALID_ARGUMENT naming what was wrong for
garbage, never OK, never a hang), and for every check after the run that
fails: both processes alive, nothing leaked, no handler exception in the
daemon's log, refusals logged but rate-limited, a task and an actor call
still work. The seed is printed; MESHRAY_FUZZ_SEED picks another, and
`python -m chaos fuzz-wire --seed S --case N` replays one case.
"""
from __future__ import annotations

import os

import pytest

from meshray.testing import fuzz_cases as fc
from meshray.testing.fuzz_local import run_local

SEED = int(os.environ.get("MESHRAY_FUZZ_SEED", "20240611"))

pytestmark = pytest.mark.timeout(240)


def test_seeded_wire_fuzz_of_node_and_actor():
    report = run_local(SEED, seconds=15.0, settle_s=30.0, echo=print)
    summary = report.summary()
    print(summary)
    assert report.ok, summary
    # Not a vacuous pass: both servers were reached with every kind of case,
    # garbage was refused, valid requests were accepted, and refusals logged.
    served = report.checks["served"]
    assert {"meshray.NodePeer", "meshray.NodeService"} <= set(served["node"]), summary
    assert "meshray.ActorService" in served["actor"], summary
    assert served["session"] == ["meshray.NodeSession"], summary
    assert set(report.by_kind) == set(fc.KINDS), summary
    assert report.by_expect[fc.INVALID] >= 200, summary
    assert report.answers["template"]["OK"] >= 20, summary
    assert report.checks["refusals_logged"] > 0, summary
    for what in ("a task", "an actor call", "a question to the node"):
        assert report.checks[f"after the run, {what}"] == "ok", summary
