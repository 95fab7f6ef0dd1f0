"""Ray-compatible scheduling strategy objects.

These are plain, picklable value objects: they travel inside task specs from
the submitter to whichever node daemon ends up scheduling the task, and the
pure policy in `meshray.scheduler.policy` interprets them. Arguments are
checked at construction so a typo fails at the call site that wrote it, not
later on a remote node.

They live beside the policy, below the public API, because the submitting
core and the scheduling node both use them; users import them from
`meshray.util.scheduling_strategies`, Ray's public path.

Besides these classes a strategy may be the string "DEFAULT" or "SPREAD"
(or None, meaning DEFAULT).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Union

__all__ = [
    "PlacementGroupSchedulingStrategy",
    "NodeAffinitySchedulingStrategy",
    "NodeLabelSchedulingStrategy",
    "In",
    "NotIn",
    "Exists",
    "DoesNotExist",
    "LabelMatchExpressionsT",
    "SchedulingStrategyT",
]


def _id_to_hex(node_id: Any) -> str:
    # Node ids arrive as hex strings (Ray's public form), raw bytes, or id
    # objects with .hex(); the policy compares them as hex strings.
    if isinstance(node_id, str):
        return node_id
    if isinstance(node_id, (bytes, bytearray)):
        return bytes(node_id).hex()
    hexer = getattr(node_id, "hex", None)
    if callable(hexer) and not isinstance(node_id, (int, float)):
        value = hexer()
        if isinstance(value, str):
            return value
    raise ValueError(
        f"NodeAffinitySchedulingStrategy argument 'node_id' must be a hex string "
        f"(or bytes / an id with .hex()), got {node_id!r} of type {type(node_id).__name__}."
    )


class PlacementGroupSchedulingStrategy:
    """Run inside a placement group's reserved bundle(s).

    The policy does not place these itself: it hands them back to the caller,
    which knows where each bundle was reserved.
    """

    def __init__(
        self,
        placement_group: Any,
        placement_group_bundle_index: int = -1,
        placement_group_capture_child_tasks: Optional[bool] = None,
    ):
        if placement_group is not None and (
            isinstance(placement_group, (str, bytes, int, float)) or not hasattr(placement_group, "id")
        ):
            raise ValueError(
                "PlacementGroupSchedulingStrategy argument 'placement_group' must be a "
                f"PlacementGroup (an object with an 'id') or None, got {placement_group!r}."
            )
        if (
            isinstance(placement_group_bundle_index, bool)
            or not isinstance(placement_group_bundle_index, int)
            or placement_group_bundle_index < -1
        ):
            raise ValueError(
                "PlacementGroupSchedulingStrategy argument 'placement_group_bundle_index' "
                f"must be an int >= -1 (-1 means any bundle), got {placement_group_bundle_index!r}."
            )
        if placement_group_capture_child_tasks is not None and not isinstance(
            placement_group_capture_child_tasks, bool
        ):
            raise ValueError(
                "PlacementGroupSchedulingStrategy argument "
                "'placement_group_capture_child_tasks' must be a bool or None, got "
                f"{placement_group_capture_child_tasks!r}."
            )
        self.placement_group = placement_group
        self.placement_group_bundle_index = placement_group_bundle_index
        self.placement_group_capture_child_tasks = placement_group_capture_child_tasks

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PlacementGroupSchedulingStrategy):
            return NotImplemented
        return (
            self.placement_group == other.placement_group
            and self.placement_group_bundle_index == other.placement_group_bundle_index
            and self.placement_group_capture_child_tasks == other.placement_group_capture_child_tasks
        )

    def __hash__(self) -> int:
        # Placement groups need not be hashable; equal strategies still hash equal.
        return hash((self.placement_group_bundle_index, self.placement_group_capture_child_tasks))

    def __repr__(self) -> str:
        return (
            f"PlacementGroupSchedulingStrategy(placement_group={self.placement_group!r}, "
            f"placement_group_bundle_index={self.placement_group_bundle_index}, "
            f"placement_group_capture_child_tasks={self.placement_group_capture_child_tasks})"
        )


class NodeAffinitySchedulingStrategy:
    """Run on one particular node.

    If the node is alive and could ever fit the request, the task runs only
    there (waiting for room if need be) - for soft affinity too, unless
    `_spill_on_unavailable` lets it go elsewhere while the node is busy.
    If the node is dead, unknown or too small: hard affinity fails the task
    (TaskUnschedulableError), soft affinity falls back to DEFAULT.
    `_fail_on_unavailable` (hard only) fails instead of waiting when busy.
    """

    def __init__(
        self,
        node_id: Any,
        soft: bool,
        _spill_on_unavailable: bool = False,
        _fail_on_unavailable: bool = False,
    ):
        node_id = _id_to_hex(node_id)
        if not node_id:
            raise ValueError("NodeAffinitySchedulingStrategy argument 'node_id' must not be empty.")
        for arg, value in (
            ("soft", soft),
            ("_spill_on_unavailable", _spill_on_unavailable),
            ("_fail_on_unavailable", _fail_on_unavailable),
        ):
            if not isinstance(value, bool):
                raise ValueError(
                    f"NodeAffinitySchedulingStrategy argument {arg!r} must be a bool, "
                    f"got {value!r} of type {type(value).__name__}."
                )
        self.node_id = node_id
        self.soft = soft
        self._spill_on_unavailable = _spill_on_unavailable
        self._fail_on_unavailable = _fail_on_unavailable

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NodeAffinitySchedulingStrategy):
            return NotImplemented
        return (
            self.node_id == other.node_id
            and self.soft == other.soft
            and self._spill_on_unavailable == other._spill_on_unavailable
            and self._fail_on_unavailable == other._fail_on_unavailable
        )

    def __hash__(self) -> int:
        return hash((self.node_id, self.soft, self._spill_on_unavailable, self._fail_on_unavailable))

    def __repr__(self) -> str:
        extra = ""
        if self._spill_on_unavailable:
            extra += ", _spill_on_unavailable=True"
        if self._fail_on_unavailable:
            extra += ", _fail_on_unavailable=True"
        return f"NodeAffinitySchedulingStrategy(node_id={self.node_id!r}, soft={self.soft}{extra})"


def _check_operator_values(values: tuple, operator: str) -> List[str]:
    if not values:
        raise ValueError(
            f"The {operator} operator needs at least one value, e.g. {operator}(\"value1\", \"value2\")."
        )
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise ValueError(
                f"Value at position {index} of the {operator} operator must be a str, "
                f"got {value!r} of type {type(value).__name__}."
            )
    return list(values)


class In:
    """Label value must be one of `values`."""

    def __init__(self, *values: str):
        self.values = _check_operator_values(values, "In")

    def matches(self, present: bool, value: Optional[str]) -> bool:
        return present and value in self.values

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.values == self.values  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(self.values)))

    def __repr__(self) -> str:
        return f"In({', '.join(map(repr, self.values))})"


class NotIn:
    """Label must be absent or have a value not in `values`."""

    def __init__(self, *values: str):
        self.values = _check_operator_values(values, "NotIn")

    def matches(self, present: bool, value: Optional[str]) -> bool:
        return not present or value not in self.values

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.values == self.values  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(self.values)))

    def __repr__(self) -> str:
        return f"NotIn({', '.join(map(repr, self.values))})"


class Exists:
    """Label must be present (any value)."""

    def matches(self, present: bool, value: Optional[str]) -> bool:
        return present

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self).__name__)

    def __repr__(self) -> str:
        return "Exists()"


class DoesNotExist:
    """Label must be absent."""

    def matches(self, present: bool, value: Optional[str]) -> bool:
        return not present

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self).__name__)

    def __repr__(self) -> str:
        return "DoesNotExist()"


_OPERATORS = (In, NotIn, Exists, DoesNotExist)
LabelMatchExpressionsT = Dict[str, Union[In, NotIn, Exists, DoesNotExist]]


class _LabelMatchExpression:
    """One `key: operator` condition on a node's labels."""

    def __init__(self, key: str, operator: Union[In, NotIn, Exists, DoesNotExist]):
        self.key = key
        self.operator = operator

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        return self.operator.matches(present, labels.get(self.key))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _LabelMatchExpression):
            return NotImplemented
        return self.key == other.key and self.operator == other.operator

    def __hash__(self) -> int:
        return hash((self.key, self.operator))

    def __repr__(self) -> str:
        return f"{self.key!r}: {self.operator!r}"


def _to_expressions(mapping: Optional[LabelMatchExpressionsT], param: str) -> List[_LabelMatchExpression]:
    if mapping is None:
        return []
    if not isinstance(mapping, Mapping):
        raise ValueError(
            f"NodeLabelSchedulingStrategy argument {param!r} must be a dict like "
            f"{{\"key1\": In(\"value1\")}}, got {mapping!r} of type {type(mapping).__name__}."
        )
    out = []
    for key, op in mapping.items():
        if not isinstance(key, str) or not key:
            raise ValueError(
                f"NodeLabelSchedulingStrategy argument {param!r} keys must be non-empty str, "
                f"got {key!r} of type {type(key).__name__}."
            )
        if not isinstance(op, _OPERATORS):
            raise ValueError(
                f"NodeLabelSchedulingStrategy argument {param!r} value for key {key!r} must be "
                f"In(...), NotIn(...), Exists() or DoesNotExist(), got {op!r} of type "
                f"{type(op).__name__}."
            )
        out.append(_LabelMatchExpression(key, op))
    return out


class NodeLabelSchedulingStrategy:
    """Choose nodes by their labels: `hard` must match, `soft` is preferred.

    Example: NodeLabelSchedulingStrategy({"region": In("us")}, soft={"gpu": Exists()})
    """

    def __init__(self, hard: Optional[LabelMatchExpressionsT], soft: Optional[LabelMatchExpressionsT] = None):
        self.hard = _to_expressions(hard, "hard")
        self.soft = _to_expressions(soft, "soft")
        if not (self.hard or self.soft):
            raise ValueError(
                "NodeLabelSchedulingStrategy arguments 'hard' and 'soft' cannot both be empty."
            )

    def matches_hard(self, labels: Mapping[str, str]) -> bool:
        return all(e.matches(labels) for e in self.hard)

    def matches_soft(self, labels: Mapping[str, str]) -> bool:
        return all(e.matches(labels) for e in self.soft)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NodeLabelSchedulingStrategy):
            return NotImplemented
        return self.hard == other.hard and self.soft == other.soft

    def __hash__(self) -> int:
        return hash((tuple(self.hard), tuple(self.soft)))

    def __repr__(self) -> str:
        hard = "{" + ", ".join(map(repr, self.hard)) + "}"
        soft = "{" + ", ".join(map(repr, self.soft)) + "}"
        return f"NodeLabelSchedulingStrategy(hard={hard}, soft={soft})"


SchedulingStrategyT = Union[
    None,
    str,  # "DEFAULT" or "SPREAD"
    PlacementGroupSchedulingStrategy,
    NodeAffinitySchedulingStrategy,
    NodeLabelSchedulingStrategy,
]
