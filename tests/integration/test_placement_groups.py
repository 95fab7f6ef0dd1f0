"""Placement groups end to end: real etcd, real daemons, real workers."""
from __future__ import annotations

import importlib
import sys
import time

import cloudpickle
import pytest

from tests.helpers import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])


pytestmark = pytest.mark.meshray_init(num_cpus=4, resources={"slot": 2})


def _pg_api():
    api = importlib.import_module("meshray.util.placement_group")
    from meshray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    return api, PlacementGroupSchedulingStrategy


def test_create_reserves_and_remove_returns_resources(ray):
    api, Strategy = _pg_api()
    before = ray.available_resources()["CPU"]
    pg = api.placement_group([{"CPU": 1}, {"CPU": 1, "slot": 1}], strategy="PACK", name="pair")
    assert pg.wait(timeout_seconds=20)
    assert pg.bundle_count == 2 and pg.bundle_specs[1] == {"CPU": 1.0, "slot": 1.0}
    assert ray.get(pg.ready(), timeout=20) == pg
    table = api.placement_group_table(pg)
    assert table["state"] == "CREATED" and table["strategy"] == "PACK" and table["name"] == "pair"
    assert set(table["bundles_to_node_id"]) == {0, 1}
    wait_for(lambda: ray.available_resources()["CPU"] == before - 2, message="bundles reserved")
    assert api.get_placement_group("pair") == pg
    api.remove_placement_group(pg)
    assert api.placement_group_table(pg)["state"] == "REMOVED"
    wait_for(lambda: ray.available_resources()["CPU"] == before, message="bundles returned")


def test_tasks_and_actors_run_in_their_bundle(ray):
    api, Strategy = _pg_api()
    pg = api.placement_group([{"CPU": 1, "slot": 1}], strategy="STRICT_PACK")
    assert pg.wait(20)

    @ray.remote(num_cpus=1, resources={"slot": 1})
    def in_group():
        current = api.get_current_placement_group()
        return current.id.hex() if current else None

    strategy = Strategy(pg, 0)
    assert ray.get(in_group.options(scheduling_strategy=strategy).remote(), timeout=30) == pg.id.hex()

    @ray.remote(num_cpus=1)
    class Member:
        def group(self):
            current = api.get_current_placement_group()
            return current.id.hex() if current else None

    member = Member.options(scheduling_strategy=strategy).remote()
    assert ray.get(member.group.remote(), timeout=30) == pg.id.hex()
    # The bundle is full now: a second task in it waits, others still run.
    waiting = in_group.options(scheduling_strategy=strategy).remote()
    ready, _ = ray.wait([waiting], timeout=1.0)
    assert ready == []
    ray.kill(member)
    assert ray.get(waiting, timeout=30) == pg.id.hex()
    api.remove_placement_group(pg)


def test_request_that_cannot_fit_its_bundle_is_value_error(ray):
    api, Strategy = _pg_api()
    pg = api.placement_group([{"CPU": 1}])
    assert pg.wait(20)

    @ray.remote(num_cpus=2)
    def too_big():
        return 1

    with pytest.raises(ValueError):
        too_big.options(scheduling_strategy=Strategy(pg, 0)).remote()
    with pytest.raises(ValueError):
        too_big.options(num_cpus=1, scheduling_strategy=Strategy(pg, 5)).remote()
    api.remove_placement_group(pg)


def test_removed_group_fails_queued_and_running_work_fast(ray, tmp_path):
    api, Strategy = _pg_api()
    pg = api.placement_group([{"CPU": 1}])
    assert pg.wait(20)
    started = tmp_path / "started"

    @ray.remote(num_cpus=1)
    def hold(path):
        open(path, "w").write("x")
        time.sleep(60)

    strategy = Strategy(pg, 0)
    running = hold.options(scheduling_strategy=strategy).remote(str(started))
    wait_for(started.exists, message="task running in the bundle")
    queued = hold.options(scheduling_strategy=strategy).remote(str(tmp_path / "never"))
    api.remove_placement_group(pg)
    for ref in (running, queued):
        with pytest.raises(ray.exceptions.TaskPlacementGroupRemoved):
            ray.get(ref, timeout=30)
    late = hold.options(scheduling_strategy=strategy).remote(str(tmp_path / "late"))
    with pytest.raises(ray.exceptions.TaskPlacementGroupRemoved):
        ray.get(late, timeout=30)

    pg2 = api.placement_group([{"CPU": 1}])
    assert pg2.wait(20)

    @ray.remote(num_cpus=1)
    class Member:
        def ping(self):
            return "pong"

    member = Member.options(scheduling_strategy=Strategy(pg2, 0)).remote()
    assert ray.get(member.ping.remote(), timeout=30) == "pong"
    api.remove_placement_group(pg2)
    # Removal is asynchronous, as in Ray; a read returns once it is committed.
    assert api.placement_group_table(pg2)["state"] == "REMOVED"

    def member_died() -> bool:
        # A call may still be answered while the removal reaches the actor's node.
        try:
            ray.get(member.ping.remote(), timeout=30)
        except ray.exceptions.RayActorError:
            return True
        return False

    wait_for(member_died, timeout=30, message="the removed group's actor died")


def test_infeasible_group_wait_honours_timeout(ray):
    api, _ = _pg_api()
    pg = api.placement_group([{"CPU": 64}])
    start = time.monotonic()
    assert pg.wait(timeout_seconds=1) is False
    assert time.monotonic() - start < 10
    assert api.placement_group_table(pg)["state"] == "PENDING"
    api.remove_placement_group(pg)


def test_bad_input_is_value_error(ray):
    api, _ = _pg_api()
    for bundles, kwargs in (([{"CPU": 1}], {"strategy": "BOGUS"}), ([], {}), ([{}], {}),
                            ([{"CPU": -1}], {}), ([{"CPU": 1}], {"lifetime": "forever"})):
        with pytest.raises(ValueError):
            api.placement_group(bundles, **kwargs)


def test_capture_child_tasks(ray):
    api, Strategy = _pg_api()
    pg = api.placement_group([{"CPU": 1}, {"CPU": 1}])
    assert pg.wait(20)

    @ray.remote(num_cpus=1)
    def child():
        current = api.get_current_placement_group()
        return current.id.hex() if current else None

    @ray.remote(num_cpus=1)
    def parent():
        return ray.get(child.remote(), timeout=30)

    captured = parent.options(scheduling_strategy=Strategy(pg, 0, True)).remote()
    assert ray.get(captured, timeout=60) == pg.id.hex()
    api.remove_placement_group(pg)
