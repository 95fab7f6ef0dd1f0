"""A node's placement-group duties (node/placement_groups.py), with a stand-in node.

PlacementDuties is given the node whose resources, queue, membership and
task lifecycle it acts on; here that node is a recorder, so these tests
check what etcd's word makes it do: bundles listed in the node's alloc
record are taken out of the general pool and returned when they leave it,
tasks draw on their bundle, and work waiting for a removed group fails.
"""
from __future__ import annotations

from types import SimpleNamespace

import cloudpickle

from meshray import exceptions
from meshray.node.placement_groups import PlacementDuties
from meshray.node.task_lifecycle import TaskState
from meshray.node.tasks import TaskQueue
from meshray.scheduler.resources import NodeResources, ResourceSet
from tests.helpers import RecordingDispatch

PG = "01" * 18


class _Node:
    """What PlacementDuties reads and calls on its node, recorded."""

    def __init__(self):
        self.node_hex = "aa" * 28
        self.resources = NodeResources({"CPU": 4.0})
        self.config = SimpleNamespace(gpu_ids=[])
        self.queue = TaskQueue()
        self.alloc = None
        self.records = {}
        placer = SimpleNamespace(creating=lambda pg: False, removing=lambda pg: False)
        # A node of a small cluster: its slice holds every group
        # (node/group_follow.py); the groups it says it needs are recorded.
        self.followed, self.needed = [], []
        self.membership = SimpleNamespace(placer=placer,
                                          pg_snapshot=lambda: (self.records, self.alloc),
                                          follow_groups=self.followed.append,
                                          need_group=self.needed.append,
                                          follows_group=lambda pg: True)
        self.failed, self.moves = [], []
        self.dispatch = RecordingDispatch(self.queue)

    def _fail(self, task, error):
        self.failed.append((task, error))

    def _move(self, task, new, cause):
        self.moves.append((task, new))



def _alloc(*bundles):
    return SimpleNamespace(bundles=[SimpleNamespace(pg_id=PG, index=i, resources=r)
                                    for i, r in bundles])


class _Task:
    """A task record's fields the duties read (hashable: bundle pools keep sets)."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


def _group_task(index: int, cpu: float = 1.0):
    strategy = SimpleNamespace(placement_group=SimpleNamespace(id=bytes.fromhex(PG)),
                               placement_group_bundle_index=index)
    spec = SimpleNamespace(strategy_blob=cloudpickle.dumps(strategy), name="t",
                           scheduling_strategy="PlacementGroupSchedulingStrategy")
    return _Task(spec=spec, task_id=b"\x07" * 4, actor=None, cancelled=False,
                 pg_since=0.0, pg_hex="", pg_index=-1, bundle=None, bundle_gpu_ids=[],
                 hold=ResourceSet.from_dict({"CPU": cpu}))


def test_bundles_in_the_alloc_record_leave_the_general_pool_until_they_leave_it():
    node = _Node()
    placement = PlacementDuties(node)
    node.alloc = _alloc((0, {"CPU": 3.0}))
    placement.on_change()
    assert node.resources.available.to_dict() == {"CPU": 1.0}
    assert set(placement.bundles) == {(PG, 0)} and node.dispatch.schedules == 1
    assert node.followed[-1] == {PG}         # a group with a bundle here is needed

    task = _bound(_group_task(0, cpu=2.0))
    assert placement.try_acquire_bundle(task)
    assert not placement.try_acquire_bundle(_bound(_group_task(0, cpu=2.0)))   # 1 CPU left
    placement.release_bundle(task)
    assert placement.bundles[(PG, 0)].available.to_dict() == {"CPU": 3.0}

    node.alloc = _alloc()
    placement.on_change()
    assert placement.bundles == {}
    assert node.resources.available.to_dict() == {"CPU": 4.0}
    assert node.followed[-1] == set()


def _bound(task):
    task.bundle = (PG, 0)
    return task


def test_work_waiting_for_a_group_fails_once_the_group_is_removed():
    node = _Node()
    placement = PlacementDuties(node)
    task = _group_task(0)
    placement.route_to_group(task)          # no record yet: it waits
    assert placement.waiting == [task] and node.failed == []
    assert task.pg_hex == PG and node.moves[-1][1] == TaskState.WAITING_GROUP
    assert node.needed == [PG]               # its record is wanted

    node.records = {PG: SimpleNamespace(state="REMOVED", placement=(None,))}
    placement.on_change()
    assert placement.waiting == []
    [(failed, error)] = node.failed
    assert failed is task and isinstance(error, exceptions.TaskPlacementGroupRemoved)
    assert PG in repr(error)


def test_a_cancelled_task_stops_waiting_for_its_bundle():
    node = _Node()
    placement = PlacementDuties(node)
    task = _group_task(0)
    placement.route_to_group(task)
    placement.drop_waiting(task)
    placement.drop_waiting(task)             # twice is harmless
    assert placement.waiting == []
