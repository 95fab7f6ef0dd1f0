"""Id classes user code touches (`meshray.ActorID`, ...), as Ray documents them."""
import pickle

import pytest

import meshray
from meshray.common import ids

ID_CLASSES = [meshray.ActorID, meshray.NodeID, meshray.JobID, meshray.TaskID, meshray.WorkerID,
              meshray.UniqueID, meshray.FunctionID, meshray.ActorClassID,
              meshray.PlacementGroupID]


@pytest.mark.parametrize("cls", ID_CLASSES, ids=lambda c: c.__name__)
def test_hex_binary_round_trip_equality_and_hash(cls):
    one = cls.from_random()
    assert cls.from_hex(one.hex()) == one
    assert cls.from_binary(one.binary()) == one
    assert hash(cls.from_hex(one.hex())) == hash(one)
    assert len(one.binary()) == cls.size() and len(one.hex()) == 2 * cls.size()
    assert one != cls.from_random()
    assert pickle.loads(pickle.dumps(one)) == one
    assert repr(one) == f"{cls.__name__}({one.hex()})"


@pytest.mark.parametrize("cls", ID_CLASSES, ids=lambda c: c.__name__)
def test_nil_is_all_ff_and_only_nil_is_nil(cls):
    assert cls.nil().is_nil()
    assert cls.nil().binary() == b"\xff" * cls.size()
    assert not cls.from_random().is_nil()


def test_ids_of_different_kinds_never_compare_equal():
    raw = b"\x01" * 16
    assert meshray.ActorID(raw) != meshray.TaskID(raw)
    assert len({meshray.ActorID(raw), meshray.TaskID(raw), meshray.NodeID(raw)}) == 3


def test_bad_input_names_the_class_and_what_was_expected():
    with pytest.raises(ValueError, match=r"ActorID\.from_hex\(\) expected 32 hex digits"):
        meshray.ActorID.from_hex("xyz")
    with pytest.raises(ValueError, match="JobID must be 8 bytes, got 3"):
        meshray.JobID(b"abc")
    with pytest.raises(TypeError, match="NodeID needs bytes, got str"):
        meshray.NodeID("ab" * 16)


def test_widths_are_meshrays_own():
    assert meshray.TaskID.size() == ids.TASK_ID_LEN
    assert meshray.JobID.size() == len(ids.new_job_id())


def test_object_ref_hex_from_hex_binary_and_nil():
    # No cluster: refs are inert names here.
    ref = meshray.ObjectRef(ids.object_id_for(b"\x02" * ids.TASK_ID_LEN, 1))
    assert meshray.ObjectRef.from_hex(ref.hex()) == ref
    assert meshray.ObjectRef.from_binary(ref.binary()) == ref
    assert {ref: 1}[meshray.ObjectRef.from_hex(ref.hex())] == 1
    assert ref.task_id() == meshray.TaskID(b"\x02" * ids.TASK_ID_LEN)
    assert meshray.ObjectRef.nil().is_nil() and not ref.is_nil()
    assert meshray.ObjectID is meshray.ObjectRef   # Ray's older name
    with pytest.raises(ValueError, match="ObjectRef.from_hex"):
        meshray.ObjectRef.from_hex("00")


def test_object_refs_sort_by_id_in_hex_order():
    refs = [meshray.ObjectRef(ids.object_id_for(bytes([b]) * ids.TASK_ID_LEN, index))
            for b, index in ((9, 1), (2, 3), (2, 1), (200, 2), (17, 1))]
    ordered = sorted(refs)
    assert [ref.hex() for ref in ordered] == sorted(ref.hex() for ref in refs)
    low, high = ordered[0], ordered[-1]
    assert low < high and low <= high and high > low and high >= low
    assert not high < low and not low > high
    twin = meshray.ObjectRef.from_hex(low.hex())
    assert low <= twin and low >= twin and not low < twin     # equal ids: neither is less
    assert min(refs) is low and max(refs) is high
    with pytest.raises(TypeError):
        low < "a string"
