"""The node's decisions about the tasks placed on it, as a pure state machine
(``machine.py``), and the events and instructions it speaks (``messages.py``)."""
from meshray.node.state.machine import (
    CRASHED,
    FAIL,
    RETRY,
    RETRY_LATER,
    NodeState,
    NoWorkers,
    retry_or_fail,
)

__all__ = ["NodeState", "NoWorkers", "retry_or_fail", "RETRY", "RETRY_LATER", "FAIL", "CRASHED"]
