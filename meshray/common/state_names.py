"""The base of the node's lifecycle state enums (tasks, actors, objects).

A state is its name everywhere it leaves the process -- etcd records, the
event log, the state API, error messages -- so each enum is a ``str`` whose
``str()`` is the bare value ("running", not "TaskState.RUNNING").
``enum.StrEnum`` does this from Python 3.11; this works on 3.10 too.
"""
from __future__ import annotations

import enum

__all__ = ["StateName"]


class StateName(str, enum.Enum):
    def __str__(self) -> str:
        return self.value
