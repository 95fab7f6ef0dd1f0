"""A CI-sized `meshray scale-test`: 60 hollow nodes in 3 host processes beside
one real node, on one etcd member. Correctness only (never speed): every
node joins and sees every other, every task result is right and some ran
on hollow nodes, every actor and placement group is created and no node is
ever over-committed, every killed node is seen dead by every surviving
peer, and nothing is left behind."""
from __future__ import annotations

import os

import pytest

from tests.helpers import process_gone

HOLLOW = 60
PER_HOST = 20
TASKS = 3000
ACTORS = 300
PGS = 100


def _args(*extra):
    from meshray.cli.main import build_parser
    return build_parser().parse_args([
        "scale-test", "--nodes", str(HOLLOW), "--nodes-per-host", str(PER_HOST),
        "--lease-ttl", "2", "--tasks", str(TASKS), "--actors", str(ACTORS), "--pgs", str(PGS),
        "--idle-s", "3",
        "--join-timeout", "60", "--task-timeout", "60", "--quiet", *extra])


@pytest.mark.timeout(180)
@pytest.mark.parametrize("slice_target", [None, 16], ids=["every-availability", "sliced"])
def test_hollow_cluster_runs_work_and_sees_every_death(slice_target, monkeypatch):
    """Also with each node following the availability of only half the
    members (node/avail_slice.py: a slice target of 16 halves 61 members):
    work still spreads, and a node outside the slice is still offered work."""
    from meshray.scale import scale_test

    if slice_target is not None:
        monkeypatch.setenv("MESHRAY_AVAIL_SLICE_TARGET", str(slice_target))
    runs = []
    result = scale_test.run(_args(), on_start=runs.append)
    scale = runs[0]

    assert "error" not in result, result["error"]
    assert result["nodes_joined"] == HOLLOW and result["join_s"] is not None
    if slice_target is None:
        assert result["avail_slice_bits"] == 0
        assert result["avail_followed_max"] == HOLLOW + 1       # every member, itself too
    else:
        assert result["avail_slice_bits"] == 1
        assert 0 < result["avail_followed_max"] < HOLLOW        # its half, about 30
    assert result["many_tasks_checked"] == TASKS
    used = result["tasks_by_node"]
    assert used["hollow_tasks"] > 0 and used["hollow_nodes_used"] >= 2, used
    # One kill seen by the 59 others; then 10% (6) seen by the 53 left.
    assert result["detect_missed"] == 0
    assert result["detect_observations"] == (HOLLOW - 1) + (HOLLOW - 7) * 6
    assert result["detect_p99_s"] is not None and result["detect_10pct_p99_s"] is not None
    # Every actor created; every group created, and no revision of the reservations
    # (all recorded, replayed one by one) had a node holding more than it offers.
    assert result["many_actors_created"] == ACTORS and result["many_actors_per_s"] > 0
    assert result["many_pgs_created"] == PGS and result["many_pgs_per_s"] > 0
    assert result["pg_overcommit_violations"] == 0
    assert result["pg_peak_reserved_bundles"] >= 3 and result["pg_alloc_revisions_replayed"] >= 2
    # The real node timed its placement decisions (tasks and actors spilled from it).
    assert result["spill_decisions"] > 0 and result["spill_decision_p99_ms"] > 0

    # Nothing left behind: host processes exited cleanly, their dirs and
    # every hollow node's store dir are gone, etcd and the real node too.
    assert [host.process.returncode for host in scale.hosts] == [0] * len(scale.hosts)
    assert not os.path.exists(scale.base_dir)
    hollow = scale.hollow_ids
    assert len(hollow) == HOLLOW
    assert not [n for n in hollow if os.path.exists(f"/dev/shm/meshray-{n[:12]}")]
    for pid in [node.pid for node in scale.real] + scale.engine.etcd_pids():
        assert process_gone(pid)


def test_unknown_scenario_is_refused_with_its_name():
    from meshray.scale import scale_test
    with pytest.raises(ValueError, match="--scenarios='join,bogus'.*bogus"):
        scale_test.run(_args("--scenarios", "join,bogus"))


@pytest.mark.timeout(120)
def test_a_host_told_to_stop_while_starting_its_nodes_leaves_nothing_behind(tmp_path):
    """SIGTERM to a host the driver has not heard ready from (a join it gave
    up on): the nodes started so far stop, their session and store dirs go.
    (Should the host finish starting first, the same signal stops it all the same.)"""
    from meshray.scale import scale_test
    from meshray.testing.engine import ClusterEngine
    from tests.helpers import wait_for

    args = _args("--cpus", "4")
    engine = ClusterEngine(lease_ttl=2.0, dir_prefix="meshray-scale-term-").start()
    try:
        host = scale_test.HostProcess(args, 0, 40, engine.address, engine.token, str(tmp_path))
        base = tmp_path / "host0"
        started = lambda: [d for d in base.iterdir() if d.is_dir()] if base.exists() else []  # noqa: E731
        wait_for(lambda: len(started()) >= 2, timeout=60, message="the host starts nodes")
        stores = {f"/dev/shm/meshray-{d.name}" for d in started()}
        assert any(os.path.exists(s) for s in stores)
        host.close()
        assert not host.ready
        assert host.process.returncode == 128 + 15, host.process.returncode
        # Its nodes' store dirs are gone (their session dirs are under the base
        # dir, which the driver removes: ScaleRun.close).
        assert not [s for s in stores if os.path.exists(s)]
    finally:
        engine.close()
