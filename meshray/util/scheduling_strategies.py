"""Ray's public path for scheduling strategies (`ray.util.scheduling_strategies`).

The classes are defined in `meshray.scheduler.strategies`, below the public
API, since the core that submits a task and the node that schedules it both
read them; this module is where Ray programs import them from.
"""
from meshray.scheduler.strategies import (
    DoesNotExist,
    Exists,
    In,
    LabelMatchExpressionsT,
    NodeAffinitySchedulingStrategy,
    NodeLabelSchedulingStrategy,
    NotIn,
    PlacementGroupSchedulingStrategy,
    SchedulingStrategyT,
)

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
