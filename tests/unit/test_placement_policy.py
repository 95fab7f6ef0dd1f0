"""Pure placement-group logic: bundle placement, input checks, records, the
public API's validation (which must fail before any I/O)."""
import importlib
import pickle

import pytest

from meshray.core import state as state_mod
from meshray.placement import policy, records
from meshray.placement.policy import Infeasible, NodeCapacity, Placed, place_bundles
from meshray.placement.records import (
    CREATED,
    MAX_NODES_PER_TXN,
    PENDING,
    REMOVED,
    RESCHEDULING,
    AllocRecord,
    BundleAlloc,
    PlacementGroupID,
    PlacementGroupRecord,
)
from meshray.scheduler.resources import ResourceSet
pg_api = importlib.import_module("meshray.util.placement_group")


def node(node_id, cpu=4, gpu=0, reserved=None, avail=None, **extra):
    total = {"CPU": cpu, **({"GPU": gpu} if gpu else {}), **extra}
    return NodeCapacity(node_id, ResourceSet(total), ResourceSet(reserved or {}),
                        None if avail is None else ResourceSet(avail))


def cpu(n):
    return {"CPU": n}


# --------------------------------------------------------------------------
# PACK


def test_pack_puts_everything_on_one_node_when_it_fits():
    out = place_bundles([cpu(1)] * 3, "PACK", [node("a"), node("b"), node("c")])
    assert isinstance(out, Placed)
    assert len(set(out.assignment.values())) == 1
    assert sorted(out.assignment) == [0, 1, 2]


def test_pack_prefers_tightest_single_node():
    out = place_bundles([cpu(2)], "PACK", [node("big", cpu=16), node("small", cpu=2)])
    assert out.assignment == {0: "small"}


def test_pack_spills_to_fewest_nodes_when_needed():
    nodes = [node("a", cpu=4), node("b", cpu=4), node("c", cpu=4)]
    out = place_bundles([cpu(2)] * 4, "PACK", nodes)
    assert out.ok
    assert len(set(out.assignment.values())) == 2


def test_pack_respects_reservations_and_availability():
    nodes = [node("a", cpu=4, reserved=cpu(3)), node("b", cpu=4, avail=cpu(1)),
             node("c", cpu=4)]
    out = place_bundles([cpu(2)], "PACK", nodes)
    assert out.assignment == {0: "c"}


def test_availability_hint_can_be_ignored():
    out = place_bundles([cpu(2)], "PACK", [node("a", avail=cpu(0))], use_availability=False)
    assert out.assignment == {0: "a"}


# --------------------------------------------------------------------------
# SPREAD


def test_spread_uses_distinct_nodes_when_possible():
    out = place_bundles([cpu(1)] * 3, "SPREAD", [node("a"), node("b"), node("c")])
    assert sorted(out.assignment.values()) == ["a", "b", "c"]


def test_spread_is_best_effort():
    out = place_bundles([cpu(1)] * 3, "SPREAD", [node("a"), node("b")])
    assert out.ok
    assert sorted(set(out.assignment.values())) == ["a", "b"]


def test_spread_falls_back_when_greedy_fails():
    # Greedy spread of equal bundles could strand the big one; largest-first
    # plus the PACK fallback must still find a fit.
    nodes = [node("a", cpu=3), node("b", cpu=1)]
    out = place_bundles([cpu(1), cpu(3)], "SPREAD", nodes)
    assert out.ok and out.assignment[1] == "a" and out.assignment[0] == "b"


# --------------------------------------------------------------------------
# STRICT_PACK


def test_strict_pack_needs_one_node_for_the_sum():
    out = place_bundles([cpu(2), cpu(2)], "STRICT_PACK", [node("a", cpu=3), node("b", cpu=3)])
    assert isinstance(out, Infeasible) and out.ever
    assert "STRICT_PACK" in out.reason


def test_strict_pack_places_all_on_one_node():
    out = place_bundles([cpu(2), cpu(2)], "STRICT_PACK", [node("a", cpu=3), node("b", cpu=4)])
    assert out.assignment == {0: "b", 1: "b"}


def test_strict_pack_waits_when_only_reservations_block():
    out = place_bundles([cpu(2), cpu(2)], "STRICT_PACK", [node("a", cpu=4, reserved=cpu(1))])
    assert isinstance(out, Infeasible) and not out.ever


# --------------------------------------------------------------------------
# STRICT_SPREAD


def test_strict_spread_one_node_per_bundle():
    out = place_bundles([cpu(1)] * 3, "STRICT_SPREAD", [node("a"), node("b"), node("c")])
    assert sorted(out.assignment.values()) == ["a", "b", "c"]


def test_strict_spread_infeasible_with_too_few_nodes():
    out = place_bundles([cpu(1)] * 3, "STRICT_SPREAD", [node("a"), node("b")])
    assert isinstance(out, Infeasible) and out.ever
    assert "STRICT_SPREAD" in out.reason


def test_strict_spread_matching_finds_the_only_assignment():
    # A greedy choice would give the GPU node to the CPU bundle first.
    nodes = [node("a", cpu=4, gpu=1), node("b", cpu=4)]
    out = place_bundles([cpu(1), {"GPU": 1}], "STRICT_SPREAD", nodes)
    assert out.assignment == {0: "b", 1: "a"}


def test_strict_spread_respects_max_nodes():
    nodes = [node(f"n{i}") for i in range(5)]
    out = place_bundles([cpu(1)] * 5, "STRICT_SPREAD", nodes, max_nodes=4)
    assert isinstance(out, Infeasible)


# --------------------------------------------------------------------------
# Infeasibility classes


def test_bundle_bigger_than_any_node_is_infeasible_ever():
    out = place_bundles([{"GPU": 8}], "PACK", [node("a", gpu=1)])
    assert isinstance(out, Infeasible) and out.ever
    assert "bundle 0" in out.reason


def test_no_nodes_is_infeasible_ever():
    out = place_bundles([cpu(1)], "PACK", [])
    assert isinstance(out, Infeasible) and out.ever and "no live nodes" in out.reason


def test_busy_nodes_are_infeasible_now():
    out = place_bundles([cpu(2)], "PACK", [node("a", avail=cpu(1))])
    assert isinstance(out, Infeasible) and not out.ever
    assert "running tasks" in out.reason


def test_reserved_nodes_are_infeasible_now():
    out = place_bundles([cpu(2)], "PACK", [node("a", reserved=cpu(3))])
    assert isinstance(out, Infeasible) and not out.ever
    assert "unreserved" in out.reason


def test_pack_limited_by_max_nodes():
    nodes = [node(f"n{i}", cpu=1) for i in range(4)]
    assert isinstance(place_bundles([cpu(1)] * 4, "PACK", nodes, max_nodes=3), Infeasible)
    assert place_bundles([cpu(1)] * 4, "PACK", nodes, max_nodes=4).ok


def test_fractional_amounts_do_not_drift():
    nodes = [node("a", cpu=1)]
    out = place_bundles([cpu(0.1)] * 10, "STRICT_PACK", nodes)
    assert out.ok
    assert isinstance(place_bundles([cpu(0.1)] * 11, "STRICT_PACK", nodes), Infeasible)


def test_unknown_strategy_rejected():
    with pytest.raises(ValueError):
        place_bundles([cpu(1)], "EVERYWHERE", [node("a")])


def test_deterministic_given_same_view():
    nodes = [node(f"n{i}", cpu=2 + i % 3) for i in range(8)]
    bundles = [cpu(1), cpu(2), cpu(1), {"CPU": 0.5}]
    first = place_bundles(bundles, "SPREAD", nodes)
    assert all(place_bundles(bundles, "SPREAD", list(reversed(nodes))) == first
               for _ in range(3))


# --------------------------------------------------------------------------
# Re-placement (RESCHEDULING)


def test_reschedule_places_only_lost_bundles():
    # Bundle 0 stays on a, bundle 1 (its node died) must move; a already
    # carries bundle 0's reservation.
    nodes = [node("a", cpu=2, reserved=cpu(1)), node("c", cpu=2)]
    out = place_bundles([cpu(1), cpu(1)], "PACK", nodes, kept={0: "a"})
    assert out.assignment == {1: "a"}


def test_reschedule_strict_spread_avoids_kept_nodes():
    nodes = [node("a", reserved=cpu(1)), node("b", reserved=cpu(1)), node("c"), node("d")]
    out = place_bundles([cpu(1)] * 3, "STRICT_SPREAD", nodes, kept={0: "a", 1: "b"})
    assert set(out.assignment) == {2} and out.assignment[2] in ("c", "d")


def test_reschedule_strict_spread_infeasible_when_only_kept_nodes_remain():
    nodes = [node("a", reserved=cpu(1)), node("b", reserved=cpu(1))]
    out = place_bundles([cpu(1)] * 3, "STRICT_SPREAD", nodes, kept={0: "a", 1: "b"})
    assert isinstance(out, Infeasible)


def test_reschedule_strict_pack_stays_on_kept_node():
    nodes = [node("a", cpu=4, reserved=cpu(1)), node("b", cpu=8)]
    out = place_bundles([cpu(1), cpu(1)], "STRICT_PACK", nodes, kept={0: "a"})
    assert out.assignment == {1: "a"}


def test_reschedule_spread_prefers_nodes_without_the_group():
    nodes = [node("a", reserved=cpu(1)), node("b")]
    out = place_bundles([cpu(1), cpu(1)], "SPREAD", nodes, kept={0: "a"})
    assert out.assignment == {1: "b"}


def test_nothing_lost_is_trivially_placed():
    out = place_bundles([cpu(1)], "PACK", [node("a", reserved=cpu(1))], kept={0: "a"})
    assert out.ok and out.assignment == {}


# --------------------------------------------------------------------------
# Submit-time fit check


def test_request_fits_bundle():
    bundles = [{"CPU": 2}, {"CPU": 1, "GPU": 1}]
    policy.validate_request_fits_bundle(bundles, 0, {"CPU": 2})
    policy.validate_request_fits_bundle(bundles, -1, {"GPU": 1})
    policy.validate_request_fits_bundle(bundles, 1, {})
    with pytest.raises(ValueError, match="bundle 0"):
        policy.validate_request_fits_bundle(bundles, 0, {"GPU": 1})
    with pytest.raises(ValueError, match="any bundle"):
        policy.validate_request_fits_bundle(bundles, -1, {"CPU": 3})
    with pytest.raises(ValueError, match="index 2 is invalid"):
        policy.validate_request_fits_bundle(bundles, 2, {"CPU": 1})
    with pytest.raises(ValueError):
        policy.validate_request_fits_bundle(bundles, -2, {"CPU": 1})


def test_request_fits_bundle_accepts_records_tables_and_handles():
    record = PlacementGroupRecord("ab" * 16, ({"CPU": 1.0},), "PACK")
    policy.validate_request_fits_bundle(record, 0, {"CPU": 1})
    policy.validate_request_fits_bundle(records.table_entry(record), 0, {"CPU": 1})
    handle = pg_api.PlacementGroup(PlacementGroupID(b"\x01" * 16), [{"CPU": 1}])
    with pytest.raises(ValueError):
        policy.validate_request_fits_bundle(handle, 0, {"CPU": 2})


def test_responsible_node_is_deterministic_and_stable():
    live = [f"n{i}" for i in range(10)]
    pick = policy.responsible_node("abcd", live)
    assert pick in live and pick == policy.responsible_node("abcd", list(reversed(live)))
    others = [n for n in live if n != pick]
    # Removing a node that was not chosen does not move the group.
    assert policy.responsible_node("abcd", [n for n in live if n != others[0]]) == pick
    moved = policy.responsible_node("abcd", others)
    assert moved in others
    assert policy.responsible_node("abcd", []) is None


# --------------------------------------------------------------------------
# Input validation


@pytest.mark.parametrize("bundles, message", [
    ([], "empty list"),
    ("CPU", "list of dicts"),
    ({"CPU": 1}, "list of dicts"),
    ([{}], "Bundle 0 is empty"),
    ([{"CPU": 0}], "Bundle 0 is empty"),
    ([{"CPU": 1}, {"CPU": -1}], "negative"),
    ([{"CPU": float("nan")}], "finite"),
    ([{"CPU": "1"}], "must be a number"),
    ([{"CPU": True}], "must be a number"),
    ([{"": 1}], "non-empty"),
    ([{"bundle": 1}], "reserved"),
    ([[("CPU", 1)]], "must be a dict"),
    ([{"CPU": 0.00001}], "precision"),
])
def test_bad_bundles(bundles, message):
    with pytest.raises(ValueError, match=message):
        records.validate_placement_group_args(bundles)


def test_bundles_are_normalised():
    spec = records.validate_placement_group_args([{"CPU": 1, "GPU": 0}, {"custom": 2}])
    assert spec.bundles == ({"CPU": 1.0}, {"custom": 2.0})
    assert spec.strategy == "PACK" and spec.lifetime is None and spec.name == ""


@pytest.mark.parametrize("strategy", ["pack", "RANDOM", 3, ""])
def test_bad_strategy(strategy):
    with pytest.raises(ValueError, match="strategy"):
        records.validate_placement_group_args([{"CPU": 1}], strategy)


def test_none_strategy_means_pack():
    assert records.validate_placement_group_args([{"CPU": 1}], None).strategy == "PACK"


@pytest.mark.parametrize("lifetime", ["DETACHED", "job", 1, ""])
def test_bad_lifetime(lifetime):
    with pytest.raises(ValueError, match="lifetime"):
        records.validate_placement_group_args([{"CPU": 1}], lifetime=lifetime)


def test_bad_name():
    with pytest.raises(ValueError, match="name"):
        records.validate_placement_group_args([{"CPU": 1}], name=5)


def test_strict_spread_bundle_cap():
    records.validate_placement_group_args([{"CPU": 1}] * MAX_NODES_PER_TXN, "STRICT_SPREAD")
    with pytest.raises(ValueError, match="STRICT_SPREAD"):
        records.validate_placement_group_args([{"CPU": 1}] * (MAX_NODES_PER_TXN + 1),
                                              "STRICT_SPREAD")
    records.validate_placement_group_args([{"CPU": 1}] * (MAX_NODES_PER_TXN + 1), "SPREAD")


def test_too_many_bundles():
    with pytest.raises(ValueError, match="at most"):
        records.validate_placement_group_args([{"CPU": 1}] * (records.MAX_BUNDLES + 1))


class _ExplodingCore:
    job_id = b"\x01" * 8
    namespace = "ns"

    def request(self, *args, **kwargs):
        raise AssertionError("validation must fail before any request is sent")


@pytest.fixture
def no_io(monkeypatch):
    monkeypatch.setattr(pg_api, "_core", lambda: _ExplodingCore())


@pytest.mark.parametrize("kwargs", [
    {"bundles": []},
    {"bundles": [{}]},
    {"bundles": [{"CPU": -1}]},
    {"bundles": [{"CPU": 1}], "strategy": "NOPE"},
    {"bundles": [{"CPU": 1}], "lifetime": "forever"},
    {"bundles": [{"CPU": 1}], "bundle_label_selector": [{"a": "b"}]},
])
def test_api_validates_before_io(no_io, kwargs):
    with pytest.raises(ValueError):
        pg_api.placement_group(**kwargs)


def test_api_misc_validation(no_io):
    with pytest.raises(ValueError):
        pg_api.get_placement_group("")
    with pytest.raises(TypeError):
        pg_api.remove_placement_group("not a group")
    with pytest.raises(ValueError):
        pg_api.PlacementGroup(PlacementGroupID(b"\x02" * 16), [{"CPU": 1}]).wait("soon")


# --------------------------------------------------------------------------
# Handles, ids, records


def test_placement_group_handle_pickles_and_compares_by_id():
    pg = pg_api.PlacementGroup(PlacementGroupID.from_random(), [{"CPU": 1}, {"GPU": 1}])
    clone = pickle.loads(pickle.dumps(pg))
    assert clone == pg and hash(clone) == hash(pg)
    assert clone.bundle_specs == [{"CPU": 1}, {"GPU": 1}] and clone.bundle_count == 2
    assert clone.id.hex() == pg.id.hex() and len(pg.id.binary()) == 16
    assert not pg.is_empty and pg_api.PlacementGroup.empty().is_empty
    assert pg != pg_api.PlacementGroup(PlacementGroupID.from_random(), [{"CPU": 1}])


def test_id_roundtrip_and_errors():
    pid = PlacementGroupID.from_random()
    assert PlacementGroupID.from_hex(pid.hex()) == pid
    with pytest.raises(ValueError):
        PlacementGroupID.from_hex("zz")
    with pytest.raises(TypeError):
        PlacementGroupID("abc")


def test_record_roundtrip_and_table_entry():
    record = PlacementGroupRecord("ab" * 16, ({"CPU": 1.0}, {"CPU": 2.0}), "SPREAD", name="x",
                                  namespace="ns", lifetime="detached", job_id="01" * 8,
                                  creator_node="cd" * 16, state=RESCHEDULING,
                                  placement=("n1", None), reason="waiting")
    again = PlacementGroupRecord.from_dict(record.to_dict())
    assert again == record
    entry = records.table_entry(record)
    assert entry["placement_group_id"] == "ab" * 16
    assert entry["bundles"] == {0: {"CPU": 1.0}, 1: {"CPU": 2.0}}
    assert entry["bundles_to_node_id"] == {0: "n1"}
    assert entry["state"] == RESCHEDULING and entry["strategy"] == "SPREAD"
    assert entry["is_detached"] and entry["name"] == "x"
    removed = records.table_entry(record.with_(state=REMOVED))
    assert removed["bundles_to_node_id"] == {}


def test_record_rejects_garbage():
    with pytest.raises(ValueError):
        PlacementGroupRecord.from_dict({"pg_id": "ab", "strategy": "PACK"})
    with pytest.raises(ValueError):
        PlacementGroupRecord.from_dict({"pg_id": "ab", "bundles": [{}], "strategy": "X"})
    with pytest.raises(ValueError):
        PlacementGroupRecord.from_dict({"v": 99, "pg_id": "ab", "bundles": [{}],
                                        "strategy": "PACK"})


def test_alloc_record_arithmetic():
    alloc = AllocRecord("n1", 7).with_bundles([BundleAlloc("p1", 0, {"CPU": 0.1}),
                                               BundleAlloc("p2", 1, {"CPU": 0.2})])
    alloc = alloc.with_bundles([BundleAlloc("p1", 1, {"CPU": 0.7})])
    assert alloc.reserved() == ResourceSet({"CPU": 1.0})
    assert alloc.holds("p1", 1) and not alloc.holds("p1", 2)
    assert AllocRecord.from_dict(alloc.to_dict()) == alloc
    assert alloc.without_pg("p1").reserved() == ResourceSet({"CPU": 0.2})
    assert alloc.without_pg("p1", [0]).keys() == {("p1", 1), ("p2", 1)}


def test_lost_bundles_and_groups_needing_placement():
    created = PlacementGroupRecord("p1", ({"CPU": 1.0},) * 3, "PACK", state=CREATED,
                                   placement=("a", "b", "a"))
    alloc_a = AllocRecord("a").with_bundles([BundleAlloc("p1", 0), BundleAlloc("p1", 2)])
    alloc_b = AllocRecord("b").with_bundles([BundleAlloc("p1", 1)])
    assert records.lost_bundles(created, ["a", "b"]) == []
    assert records.lost_bundles(created, ["a"]) == [1]
    # b re-registered under the same id: alive, but its reservations are gone.
    assert records.lost_bundles(created, ["a", "b"], {"a": alloc_a}) == [1]
    assert records.lost_bundles(created, ["a", "b"], {"a": alloc_a, "b": alloc_b}) == []
    pending = PlacementGroupRecord("p2", ({"CPU": 1.0},), "PACK", state=PENDING)
    gone = PlacementGroupRecord("p3", ({"CPU": 1.0},), "PACK", state=REMOVED)
    assert records.groups_needing_placement([created, pending, gone], ["a", "b"]) == ["p2"]
    assert records.groups_needing_placement([created, pending, gone], ["a"]) == ["p1", "p2"]


def test_get_current_placement_group_reads_the_running_spec():
    import cloudpickle
    from meshray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    class Spec:
        strategy_blob = b""

    assert pg_api.get_current_placement_group() is None
    pg = pg_api.PlacementGroup(PlacementGroupID.from_random(), [{"CPU": 1}])
    spec = Spec()
    spec.strategy_blob = cloudpickle.dumps(PlacementGroupSchedulingStrategy(pg, 0))
    state_mod.set_current_spec(spec)
    try:
        assert pg_api.get_current_placement_group() == pg
        spec.strategy_blob = cloudpickle.dumps("SPREAD")
        assert pg_api.get_current_placement_group() is None
        spec.strategy_blob = b""
        assert pg_api.get_current_placement_group() is None
    finally:
        state_mod.set_current_spec(None)


def test_check_placement_group_index():
    pg = pg_api.PlacementGroup(PlacementGroupID.from_random(), [{"CPU": 1}] * 2)
    pg_api.check_placement_group_index(pg, 1)
    pg_api.check_placement_group_index(pg, -1)
    with pytest.raises(ValueError):
        pg_api.check_placement_group_index(pg, 2)
    with pytest.raises(ValueError):
        pg_api.check_placement_group_index(None, 0)
