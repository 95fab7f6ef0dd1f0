"""Every branch of the pure scheduling policy."""
import time

import pytest

from meshray.scheduler.policy import (
    Infeasible,
    NodeView,
    RunLocal,
    SchedulingRequest,
    Spill,
    Unschedulable,
    UsePlacementGroup,
    Wait,
    decide,
    label_selector_matches,
    may_run_on,
    pick_spill_candidates,
    utilization,
    validate_label_selector,
)
from meshray.scheduler.resources import ResourceSet
from meshray.util.scheduling_strategies import (
    DoesNotExist,
    Exists,
    In,
    NodeAffinitySchedulingStrategy,
    NodeLabelSchedulingStrategy,
    NotIn,
    PlacementGroupSchedulingStrategy,
)


def rs(**kw):
    return ResourceSet(kw)


def node(node_id, total, available=None, alive=True, labels=None):
    total = ResourceSet(total)
    return NodeView(node_id, total, total if available is None else ResourceSet(available), alive, labels or {})


def cluster(*nodes):
    return {n.node_id: n for n in nodes}


def req(strategy="DEFAULT", args=None, selector=None, excluded=(), **resources):
    return SchedulingRequest(ResourceSet(resources), strategy, args or {}, selector, frozenset(excluded))


class _PG:
    id = "pg1"


# ---------------------------------------------------------------- DEFAULT
def test_default_runs_local_when_it_fits():
    nodes = cluster(node("a", {"CPU": 4}), node("b", {"CPU": 4}))
    assert decide(req(CPU=1), nodes, "a") == RunLocal()


def test_none_strategy_is_default():
    nodes = cluster(node("a", {"CPU": 4}))
    assert decide(req(strategy=None, CPU=1), nodes, "a") == RunLocal()


def test_default_spills_by_lowest_utilization_then_id():
    nodes = cluster(
        node("a", {"CPU": 4}, {"CPU": 0}),
        node("d", {"CPU": 4}, {"CPU": 1}),  # 75% used
        node("c", {"CPU": 4}, {"CPU": 4}),  # idle
        node("b", {"CPU": 4}, {"CPU": 4}),  # idle, lower id than c
    )
    assert decide(req(CPU=1), nodes, "a") == Spill(("b", "c", "d"))


def test_default_locality_beats_local():
    nodes = cluster(node("a", {"CPU": 4}), node("b", {"CPU": 4}), node("c", {"CPU": 4}))
    d = decide(req(args={"b": 10_000, "c": 5}, CPU=1), nodes, "a")
    assert d == Spill(("b", "c"))  # local 'a' is omitted; caller re-decides if all refuse


def test_default_locality_node_busy_falls_back_to_local():
    nodes = cluster(node("a", {"CPU": 4}), node("b", {"CPU": 4}, {"CPU": 0}))
    assert decide(req(args={"b": 10_000}, CPU=1), nodes, "a") == RunLocal()


def test_default_locality_tie_with_local_prefers_local():
    nodes = cluster(node("a", {"CPU": 4}), node("b", {"CPU": 4}))
    assert decide(req(args={"a": 100, "b": 100}, CPU=1), nodes, "a") == RunLocal()
    assert decide(req(args={"a": 100, "b": 101}, CPU=1), nodes, "a") == Spill(("b",))


def test_default_locality_ignores_dead_and_infeasible_nodes():
    nodes = cluster(
        node("a", {"CPU": 4}),
        node("b", {"CPU": 4}, alive=False),
        node("c", {"CPU": 0.5}),
    )
    assert decide(req(args={"b": 10**9, "c": 10**9}, CPU=1), nodes, "a") == RunLocal()


def test_default_local_busy_locality_wins_among_others():
    nodes = cluster(
        node("a", {"CPU": 4}, {"CPU": 0}),
        node("b", {"CPU": 4}),
        node("c", {"CPU": 4}, {"CPU": 1}),
    )
    assert decide(req(args={"c": 50}, CPU=1), nodes, "a") == Spill(("c", "b"))


def test_default_wait_when_feasible_but_busy():
    nodes = cluster(node("a", {"CPU": 2}, {"CPU": 0}), node("b", {"CPU": 4}, {"CPU": 1}))
    d = decide(req(CPU=2), nodes, "a")
    assert isinstance(d, Wait)
    assert d.feasible_nodes == ("a", "b")  # local first


def test_default_infeasible_when_no_total_fits():
    nodes = cluster(node("a", {"CPU": 4}), node("b", {"CPU": 8, "GPU": 1}, alive=False))
    d = decide(req(CPU=1, GPU=1), nodes, "a")
    assert isinstance(d, Infeasible)
    assert "GPU" in d.reason and "1 alive node" in d.reason


def test_default_empty_cluster_and_unknown_local():
    assert isinstance(decide(req(CPU=1), {}, "a"), Infeasible)
    nodes = cluster(node("b", {"CPU": 1}))
    assert decide(req(CPU=1), nodes, "a") == Spill(("b",))


def test_zero_resource_request_runs_local_even_when_full():
    nodes = cluster(node("a", {"CPU": 1}, {"CPU": 0}))
    assert decide(req(), nodes, "a") == RunLocal()


def test_excluded_nodes_count_as_busy():
    nodes = cluster(node("a", {"CPU": 4}, {"CPU": 0}), node("b", {"CPU": 4}), node("c", {"CPU": 4}))
    assert decide(req(CPU=1, excluded={"b"}), nodes, "a") == Spill(("c",))
    d = decide(req(CPU=1, excluded={"b", "c"}), nodes, "a")
    assert isinstance(d, Wait)
    # Excluding the local node itself forces a spill.
    nodes2 = cluster(node("a", {"CPU": 4}), node("b", {"CPU": 4}))
    assert decide(req(CPU=1, excluded={"a"}), nodes2, "a") == Spill(("b",))


def test_utilization_uses_requested_resources():
    n = node("x", {"CPU": 4, "GPU": 2}, {"CPU": 4, "GPU": 0})
    assert utilization(n, ["CPU"]) == 0.0
    assert utilization(n, ["GPU"]) == 1.0
    assert utilization(n) == 1.0


def test_gpu_task_avoids_node_with_busy_gpus():
    nodes = cluster(
        node("a", {"CPU": 4}),
        node("b", {"CPU": 8, "GPU": 4}, {"CPU": 8, "GPU": 1}),
        node("c", {"CPU": 8, "GPU": 4}, {"CPU": 1, "GPU": 4}),
    )
    assert decide(req(GPU=1), nodes, "a") == Spill(("c", "b"))


# ---------------------------------------------------------------- SPREAD
def test_spread_round_robin():
    nodes = cluster(node("c", {"CPU": 4}), node("a", {"CPU": 4}), node("b", {"CPU": 4}))
    got = [decide(req("SPREAD", CPU=1), nodes, "a", i) for i in range(4)]
    assert got[0] == RunLocal()
    assert got[1] == Spill(("b", "c"))
    assert got[2] == Spill(("c", "b"))
    assert got[3] == RunLocal()


def test_spread_rotates_over_feasible_nodes_even_when_busy():
    # Views of peers lag, so SPREAD rotates over every node that could run
    # the task; a busy local node queues it, a busy peer refuses or queues it.
    nodes = cluster(node("a", {"CPU": 1}, {"CPU": 0}), node("b", {"CPU": 1}))
    assert decide(req("SPREAD", CPU=1), nodes, "a", 0) == RunLocal()
    assert decide(req("SPREAD", CPU=1), nodes, "a", 1) == Spill(("b",))
    busy = cluster(node("a", {"CPU": 1}, {"CPU": 0}))
    assert decide(req("SPREAD", CPU=1), busy, "a") == RunLocal()
    assert isinstance(decide(req("SPREAD", CPU=2), busy, "a"), Infeasible)


def test_unknown_strategy_string():
    with pytest.raises(ValueError, match="BOGUS"):
        decide(req("BOGUS", CPU=1), cluster(node("a", {"CPU": 1})), "a")
    with pytest.raises(ValueError):
        decide(req(object(), CPU=1), cluster(node("a", {"CPU": 1})), "a")


# ---------------------------------------------------------------- affinity
def test_hard_affinity_paths():
    nodes = cluster(
        node("a", {"CPU": 4}),
        node("b", {"CPU": 4}, {"CPU": 0}),
        node("c", {"CPU": 4}),
        node("dead", {"CPU": 4}, alive=False),
        node("small", {"CPU": 1}),
    )
    hard = lambda nid, **kw: req(NodeAffinitySchedulingStrategy(nid, soft=False, **kw), CPU=2)  # noqa: E731
    assert decide(hard("a"), nodes, "a") == RunLocal()
    assert decide(hard("c"), nodes, "a") == Spill(("c",))
    d = decide(hard("b"), nodes, "a")
    assert isinstance(d, Wait) and d.feasible_nodes == ("b",)
    assert isinstance(decide(hard("b", _fail_on_unavailable=True), nodes, "a"), Unschedulable)
    d = decide(hard("dead"), nodes, "a")
    assert isinstance(d, Unschedulable) and "dead" in d.reason and d.unknown_node == ""
    # Only a node the view does not know is named: the caller may ask etcd.
    d = decide(hard("nope"), nodes, "a")
    assert isinstance(d, Unschedulable) and "nope" in d.reason and d.unknown_node == "nope"
    d = decide(hard("small"), nodes, "a")
    assert isinstance(d, Unschedulable) and "never fit" in d.reason and d.unknown_node == ""


def test_may_run_on_names_the_nodes_hard_constraints_allow():
    # A hard pin to "b" waiting on a busy "b" must never be started on "a".
    assert not may_run_on(NodeAffinitySchedulingStrategy("b", soft=False), "a", {})
    assert may_run_on(NodeAffinitySchedulingStrategy("b", soft=False), "b", {})
    assert may_run_on(NodeAffinitySchedulingStrategy("b", soft=True), "a", {})
    gpu_only = NodeLabelSchedulingStrategy({"gpu": Exists()})
    assert not may_run_on(gpu_only, "a", {})
    assert may_run_on(gpu_only, "a", {"gpu": "a100"})
    assert may_run_on(NodeLabelSchedulingStrategy(None, soft={"gpu": Exists()}), "a", {})
    assert may_run_on("DEFAULT", "a", {}) and may_run_on("SPREAD", "a", {})


def test_soft_affinity_paths():
    nodes = cluster(
        node("a", {"CPU": 4}),
        node("b", {"CPU": 4}, {"CPU": 0}),
        node("c", {"CPU": 4}),
        node("dead", {"CPU": 4}, alive=False),
    )
    soft = lambda nid, **kw: req(NodeAffinitySchedulingStrategy(nid, soft=True, **kw), CPU=2)  # noqa: E731
    assert decide(soft("c"), nodes, "a") == Spill(("c",))
    assert decide(soft("dead"), nodes, "a") == RunLocal()  # falls back to DEFAULT
    assert decide(soft("nope"), nodes, "a") == RunLocal()
    # Alive and feasible but busy: waits there, like Ray, unless allowed to spill.
    assert isinstance(decide(soft("b"), nodes, "a"), Wait)
    assert decide(soft("b", _spill_on_unavailable=True), nodes, "a") == RunLocal()
    busy = cluster(node("a", {"CPU": 4}, {"CPU": 0}), node("b", {"CPU": 4}, {"CPU": 0}))
    d = decide(soft("b", _spill_on_unavailable=True), busy, "a")
    assert isinstance(d, Wait) and d.feasible_nodes == ("b",)


# ---------------------------------------------------------------- labels & PG
def test_placement_group_is_handed_back():
    s = PlacementGroupSchedulingStrategy(_PG(), 0)
    assert decide(req(s, CPU=1), cluster(node("a", {"CPU": 1})), "a") == UsePlacementGroup(s)
    none_pg = PlacementGroupSchedulingStrategy(None)
    assert decide(req(none_pg, CPU=1), cluster(node("a", {"CPU": 1})), "a") == RunLocal()


def test_node_label_strategy_hard_and_soft():
    nodes = cluster(
        node("a", {"CPU": 4}, labels={"region": "eu"}),
        node("b", {"CPU": 4}, labels={"region": "us"}),
        node("c", {"CPU": 4}, labels={"region": "us", "gpu": "h100"}),
    )
    hard = NodeLabelSchedulingStrategy({"region": In("us")})
    assert decide(req(hard, CPU=1), nodes, "a") == Spill(("b", "c"))
    both = NodeLabelSchedulingStrategy({"region": In("us")}, soft={"gpu": Exists()})
    assert decide(req(both, CPU=1), nodes, "a") == Spill(("c", "b"))
    soft_only = NodeLabelSchedulingStrategy(None, soft={"gpu": Exists()})
    assert decide(req(soft_only, CPU=1), nodes, "a") == Spill(("c", "b"))  # local never listed
    not_in = NodeLabelSchedulingStrategy({"region": NotIn("us")})
    assert decide(req(not_in, CPU=1), nodes, "a") == RunLocal()
    missing = NodeLabelSchedulingStrategy({"gpu": DoesNotExist(), "region": In("ap")})
    d = decide(req(missing, CPU=1), nodes, "a")
    assert isinstance(d, Infeasible) and "label" in d.reason


def test_label_selector_option():
    nodes = cluster(
        node("a", {"CPU": 4}, labels={"zone": "z1"}),
        node("b", {"CPU": 4}, labels={"zone": "z2"}),
        node("c", {"CPU": 4}, labels={"zone": "z3"}),
    )
    assert decide(req(selector={"zone": "z2"}, CPU=1), nodes, "a") == Spill(("b",))
    assert decide(req(selector={"zone": "!z1"}, CPU=1), nodes, "a") == Spill(("b", "c"))
    assert decide(req(selector={"zone": "in(z1,z3)"}, CPU=1), nodes, "a") == RunLocal()
    assert decide(req(selector={"zone": "!in(z1, z2)"}, CPU=1), nodes, "a") == Spill(("c",))
    assert isinstance(decide(req(selector={"zone": "z9"}, CPU=1), nodes, "a"), Infeasible)
    aff = NodeAffinitySchedulingStrategy("b", soft=False)
    assert isinstance(decide(req(aff, selector={"zone": "z1"}, CPU=1), nodes, "a"), Unschedulable)


def test_label_selector_helpers():
    assert label_selector_matches({"k": "v"}, {"k": "v"})
    assert label_selector_matches({}, {"k": "!v"})
    assert not label_selector_matches({}, {"k": "in(v)"})
    assert label_selector_matches({"k": "v"}, None)
    validate_label_selector({"k": "in(a,b)", "j": "!x"})
    for bad in ({"k": 1}, {"k": "in(a"}, {"k": "in()"}, {"": "v"}, ["k"]):
        with pytest.raises(ValueError):
            validate_label_selector(bad)


# ---------------------------------------------------------------- helpers
def test_pick_spill_candidates_never_includes_local():
    nodes = cluster(node("a", {"CPU": 4}), node("b", {"CPU": 4}, {"CPU": 2}), node("c", {"CPU": 4}))
    assert pick_spill_candidates(req(CPU=1), nodes, "a") == ("c", "b")
    assert pick_spill_candidates(req(args={"b": 9}, CPU=1), nodes, "a") == ("b", "c")


def test_decide_is_fast():
    nodes = cluster(*(node(f"n{i:03d}", {"CPU": 16}, {"CPU": i % 17}) for i in range(100)))
    r = req(CPU=1)
    t0 = time.perf_counter()
    for _ in range(2000):
        decide(r, nodes, "n001")
    fast = (time.perf_counter() - t0) / 2000
    assert fast < 50e-6, fast  # local fast path: a few microseconds
    t0 = time.perf_counter()
    for _ in range(200):
        decide(r, nodes, "n000")  # local has 0 CPUs free: full ranking of 100 nodes
    slow = (time.perf_counter() - t0) / 200
    assert slow < 5e-3, slow


# ---------------------------------------------------------------- strategy objects
def test_strategy_objects_validate_and_pickle():
    import pickle

    aff = NodeAffinitySchedulingStrategy(b"\xab\xcd", soft=True)
    assert aff.node_id == "abcd"
    assert pickle.loads(pickle.dumps(aff)) == aff
    pg = PlacementGroupSchedulingStrategy(_PG(), 2, True)
    back = pickle.loads(pickle.dumps(pg))
    assert back.placement_group_bundle_index == 2 and back.placement_group_capture_child_tasks is True
    lab = NodeLabelSchedulingStrategy({"a": In("x", "y"), "b": NotIn("z")}, soft={"c": Exists(), "d": DoesNotExist()})
    assert pickle.loads(pickle.dumps(lab)) == lab
    assert lab.matches_hard({"a": "x"}) and not lab.matches_hard({"a": "x", "b": "z"})
    assert lab.matches_soft({"c": ""}) and not lab.matches_soft({"c": "", "d": "1"})
    assert hash(lab) == hash(pickle.loads(pickle.dumps(lab)))


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda: NodeAffinitySchedulingStrategy(123, soft=True), "node_id"),
        (lambda: NodeAffinitySchedulingStrategy("", soft=True), "node_id"),
        (lambda: NodeAffinitySchedulingStrategy("ab", soft="yes"), "soft"),
        (lambda: NodeAffinitySchedulingStrategy("ab", False, _fail_on_unavailable=1), "_fail_on_unavailable"),
        (lambda: PlacementGroupSchedulingStrategy("pg"), "placement_group"),
        (lambda: PlacementGroupSchedulingStrategy(_PG(), -2), "placement_group_bundle_index"),
        (lambda: PlacementGroupSchedulingStrategy(_PG(), True), "placement_group_bundle_index"),
        (lambda: PlacementGroupSchedulingStrategy(_PG(), 0, "no"), "placement_group_capture_child_tasks"),
        (lambda: NodeLabelSchedulingStrategy({}), "cannot both be empty"),
        (lambda: NodeLabelSchedulingStrategy(["a"]), "hard"),
        (lambda: NodeLabelSchedulingStrategy({"a": "x"}), "In"),
        (lambda: NodeLabelSchedulingStrategy({1: Exists()}), "keys"),
        (lambda: NodeLabelSchedulingStrategy(None, soft={"a": 3}), "soft"),
        (lambda: In(), "at least one value"),
        (lambda: NotIn("a", 2), "position 1"),
    ],
)
def test_strategy_argument_errors(make, needle):
    with pytest.raises(ValueError, match=needle):
        make()
