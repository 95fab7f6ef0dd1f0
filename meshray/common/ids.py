"""Identifier layout.

An object id is the id of the task that produces it plus a 4-byte index, so
a task's return ids are known at submission without asking anyone, and the
producing task (lineage) can be read off any object id. `put` objects use a
per-process "put task" id with a counter.
"""
from __future__ import annotations

import os
import random
import struct

__all__ = [
    "NODE_PREFIX_LEN",
    "new_task_id",
    "owner_prefix",
    "TASK_ID_LEN",
    "OBJECT_ID_LEN",
    "new_id",
    "new_job_id",
    "object_id_for",
    "return_ids_of",
    "task_id_of",
    "index_of",
]

TASK_ID_LEN = 16
# A task id starts with the first bytes of the id of the node it was
# submitted on: any node can tell from an object id which node owns it.
NODE_PREFIX_LEN = 6
OBJECT_ID_LEN = TASK_ID_LEN + 4
_INDEX = struct.Struct(">I")


def new_id(length: int = 16) -> bytes:
    """A random id; collisions are negligible at 128 bits."""
    return os.urandom(length)


def new_job_id() -> bytes:
    return os.urandom(8)


def object_id_for(task_id: bytes, index: int) -> bytes:
    """The id of return value (or put) number `index` of `task_id`."""
    return task_id + _INDEX.pack(index)


def return_ids_of(task_id: bytes, num_returns: int) -> list:
    """The ids a task's submitter gets back: one per return, or for a
    generator (`num_returns` < 0) the id of its end (index 0)."""
    if num_returns < 0:
        return [object_id_for(task_id, 0)]
    return [object_id_for(task_id, i + 1) for i in range(num_returns)]


def task_id_of(object_id: bytes) -> bytes:
    return object_id[:TASK_ID_LEN]


def index_of(object_id: bytes) -> int:
    return _INDEX.unpack(object_id[TASK_ID_LEN:OBJECT_ID_LEN])[0]


# Task ids are made per submission: a generator seeded from the OS once per
# process (and again in a forked child) avoids a getrandom syscall per task.
_task_rng = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _task_rng.seed(os.urandom(32)))
_TASK_RANDOM_BITS = (TASK_ID_LEN - NODE_PREFIX_LEN) * 8


def new_task_id(node_id: bytes) -> bytes:
    """A task id owned by `node_id`: its prefix, then 80 random bits."""
    return node_id[:NODE_PREFIX_LEN] + _task_rng.getrandbits(_TASK_RANDOM_BITS).to_bytes(
        TASK_ID_LEN - NODE_PREFIX_LEN, "big")


def owner_prefix(object_or_task_id: bytes) -> bytes:
    """The node-id prefix of the node that owns this object (or task)."""
    return object_or_task_id[:NODE_PREFIX_LEN]
