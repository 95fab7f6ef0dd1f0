"""Fixed-point resource arithmetic, node ledgers and device assignment."""
import pickle
import random

import pytest

from meshray.scheduler.resources import (
    UNIT_SCALE,
    GpuAllocator,
    NodeResources,
    ResourceAccountingError,
    ResourceSet,
    UnitInstanceAllocator,
    to_units,
)


def test_from_to_dict_roundtrip_and_zero_dropped():
    r = ResourceSet.from_dict({"CPU": 2, "GPU": 0.5, "custom": 0})
    assert r.to_dict() == {"CPU": 2.0, "GPU": 0.5}
    assert "custom" not in r
    assert r.names == frozenset({"CPU", "GPU"})
    assert r.get("CPU") == 2.0 and r.get("missing") == 0.0 and r.get("missing", None) is None
    assert r.units("GPU") == UNIT_SCALE // 2
    assert ResourceSet.from_dict(None).is_empty()
    assert not ResourceSet().names


def test_no_float_drift():
    total = ResourceSet({"CPU": 1})
    tenth = ResourceSet({"CPU": 0.1})
    acc = ResourceSet()
    for _ in range(10):
        acc = acc + tenth
    assert acc == total
    left = total
    for _ in range(10):
        left = left - tenth
    assert left.is_empty()


def test_one_third_rounds_and_three_fit():
    third = ResourceSet({"GPU": 1 / 3})
    assert third.units("GPU") == 3333
    assert (third + third + third).fits_in(ResourceSet({"GPU": 1}))


def test_arithmetic_and_comparison():
    a = ResourceSet({"CPU": 2, "GPU": 1})
    b = ResourceSet({"CPU": 1})
    assert (a + b).to_dict() == {"CPU": 3.0, "GPU": 1.0}
    assert (a - b).to_dict() == {"CPU": 1.0, "GPU": 1.0}
    assert b <= a and b.fits_in(a) and a >= b
    assert not a <= b
    assert ResourceSet() <= b
    with pytest.raises(ValueError, match="'CPU'"):
        b - a


def test_equality_hash_and_mapping_behaviour():
    a = ResourceSet({"CPU": 1.0, "x": 0})
    b = ResourceSet({"CPU": 1})
    assert a == b and hash(a) == hash(b)
    assert a == {"CPU": 1.0}
    assert a != {"CPU": 2.0}
    assert dict(a) == {"CPU": 1.0}
    assert len(a) == 1 and list(a) == ["CPU"]
    assert {a: 1}[b] == 1


def test_pickle_roundtrip():
    r = ResourceSet({"CPU": 1.5, "memory": 10**12})
    assert pickle.loads(pickle.dumps(r)) == r
    assert pickle.loads(pickle.dumps(r)).units("memory") == 10**12 * UNIT_SCALE


@pytest.mark.parametrize("bad", [-1, -0.5, float("nan"), float("inf")])
def test_invalid_quantities(bad):
    with pytest.raises(ValueError, match="'CPU'"):
        ResourceSet({"CPU": bad})


def test_invalid_types_and_precision():
    with pytest.raises(TypeError, match="'CPU'"):
        ResourceSet({"CPU": "1"})
    with pytest.raises(TypeError):
        ResourceSet({"CPU": True})
    with pytest.raises(TypeError):
        ResourceSet({"": 1})
    with pytest.raises(ValueError, match="precision"):
        to_units("GPU", 0.00001)
    assert to_units("GPU", 0.0001) == 1


def test_node_resources_acquire_release():
    node = NodeResources({"CPU": 4, "GPU": 2})
    req = ResourceSet({"CPU": 3})
    assert node.try_acquire(req)
    assert node.available == ResourceSet({"CPU": 1, "GPU": 2})
    assert not node.try_acquire(req)
    assert node.available == ResourceSet({"CPU": 1, "GPU": 2})
    assert node.used == ResourceSet({"CPU": 3})
    node.release(req)
    assert node.available == node.total
    with pytest.raises(ResourceAccountingError, match="released twice"):
        node.release(req)
    assert node.available == node.total
    assert node.is_feasible({"CPU": 4}) and not node.is_feasible({"CPU": 5})
    assert not node.can_fit({"TPU": 1})


def test_node_resources_release_of_unknown_resource_raises():
    node = NodeResources({"CPU": 1})
    with pytest.raises(ResourceAccountingError):
        node.release({"GPU": 1})


def test_randomized_available_stays_within_bounds():
    rng = random.Random(1234)
    total = ResourceSet({"CPU": 8, "GPU": 2, "mem": 3.5})
    node = NodeResources(total)
    held = []
    for _ in range(5000):
        if held and rng.random() < 0.45:
            node.release(held.pop(rng.randrange(len(held))))
        else:
            req = ResourceSet({
                "CPU": rng.choice([0, 0.1, 0.25, 1, 2, 1 / 3]),
                "GPU": rng.choice([0, 0, 0.5, 1, 0.3333]),
                "mem": rng.choice([0, 0.7, 1.1]),
            })
            if node.try_acquire(req):
                held.append(req)
        avail = node.available
        assert avail.fits_in(total)
        for name in total:
            assert 0 <= avail.units(name) <= total.units(name)
        assert node.used + avail == total
    for req in held:
        node.release(req)
    assert node.available == total


def test_gpu_whole_and_fractional():
    gpus = GpuAllocator([0, 1, 2, 3])
    assert gpus.assign(2) == [0, 1]
    assert gpus.assign(0.5) == [2]
    # Best fit: the half-used device 2 is fuller than the free device 3.
    assert gpus.assign(0.25) == [2]
    assert gpus.assign(0.5) == [3]  # device 2 has only 0.25 left
    assert gpus.assign(1) is None  # no fully free device remains
    assert gpus.assign(0.25) == [2]
    assert gpus.free(2) == 0.0
    gpus.release([0, 1], 2)
    assert gpus.assign(1) == [0]
    gpus.release([2], 0.5)
    gpus.release([2], 0.25)
    gpus.release([2], 0.25)
    assert gpus.free(2) == 1.0
    with pytest.raises(ResourceAccountingError, match="released twice"):
        gpus.release([2], 0.25)


def test_gpu_fractional_never_split_across_devices():
    gpus = GpuAllocator([0, 1])
    assert gpus.assign(0.6) == [0]
    assert gpus.assign(0.6) == [1]
    # 0.8 free in total, but no single device has 0.5.
    assert gpus.available() == pytest.approx(0.8)
    assert gpus.assign(0.5) is None
    assert gpus.assign(0.4) == [0]


def test_gpu_release_validation():
    gpus = GpuAllocator([0, 1])
    ids = gpus.assign(1)
    with pytest.raises(ResourceAccountingError):
        gpus.release([0, 1], 1)  # wrong count
    with pytest.raises(ResourceAccountingError):
        gpus.release([1], 1)  # 1 was never assigned
    with pytest.raises(ResourceAccountingError):
        gpus.release([7], 1)
    with pytest.raises(ResourceAccountingError):
        gpus.release([0, 1], 0.5)
    gpus.release(ids, 1)
    with pytest.raises(ResourceAccountingError):
        gpus.release(ids, 1)
    with pytest.raises(ValueError, match="whole"):
        gpus.assign(1.5)
    assert gpus.assign(0) == []


def test_unit_instance_allocator_generic_ids():
    alloc = UnitInstanceAllocator(["tpu-a", "tpu-b"], "TPU")
    assert alloc.assign(0.5) == ["tpu-a"]
    assert alloc.assign(1) == ["tpu-b"]
    assert alloc.snapshot() == {"tpu-a": 0.5, "tpu-b": 0.0}
    with pytest.raises(ValueError):
        UnitInstanceAllocator([1, 1])


def test_randomized_gpu_allocator_invariants():
    rng = random.Random(99)
    alloc = GpuAllocator(list(range(4)))
    held = []
    for _ in range(5000):
        if held and rng.random() < 0.5:
            ids, amount = held.pop(rng.randrange(len(held)))
            alloc.release(ids, amount)
        else:
            amount = rng.choice([0.1, 0.25, 0.5, 1 / 3, 1, 2])
            ids = alloc.assign(amount)
            if ids is not None:
                assert len(ids) == (1 if amount < 1 else int(amount))
                held.append((ids, amount))
        for d in range(4):
            assert 0.0 <= alloc.free(d) <= 1.0
    for ids, amount in held:
        alloc.release(ids, amount)
    assert alloc.snapshot() == {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}


def test_node_allocate_with_gpu_instances():
    node = NodeResources({"CPU": 4, "GPU": 2}, instances={"GPU": [0, 1]})
    a = node.allocate({"CPU": 1, "GPU": 0.5})
    assert a.instances == {"GPU": (0,)}
    b = node.allocate({"CPU": 1, "GPU": 1})
    assert b.instances == {"GPU": (1,)}
    # Scalar GPU free is 0.5 but one whole device is needed: refused, nothing changes.
    before = node.available
    assert node.allocate({"GPU": 0.6}) is None
    assert node.available == before
    assert node.allocate({"CPU": 1}).instances == {}
    with pytest.raises(ValueError, match="allocate"):
        node.try_acquire({"GPU": 0.1})
    node.release(a)
    with pytest.raises(ResourceAccountingError, match="already released"):
        node.release(a)
    node.release(b)
    assert node.available == ResourceSet({"CPU": 3, "GPU": 2})
    assert node.allocator("GPU").snapshot() == {0: 1.0, 1: 1.0}


def test_node_instances_must_match_total():
    with pytest.raises(ValueError, match="instances"):
        NodeResources({"GPU": 2}, instances={"GPU": [0]})
