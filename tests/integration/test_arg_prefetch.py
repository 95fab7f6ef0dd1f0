"""An argument that lives on another node is pulled when its task is dispatched,
not when the worker finds it missing."""
from __future__ import annotations

import os

import numpy as np

from tests.helpers import wait_for


def _hold_until_gate_opens():
    """A worker_process_setup_hook: the worker does nothing, arguments included,
    until the test opens the gate."""
    import os
    import time
    deadline = time.monotonic() + 60
    while not os.path.exists(os.environ["PREFETCH_GATE"]) and time.monotonic() < deadline:
        time.sleep(0.02)


def test_remote_argument_is_pulled_before_the_worker_asks(cluster, tmp_path):
    second = cluster.add_node(num_cpus=1, resources={"far": 1})
    ray = cluster.connect()

    @ray.remote(resources={"far": 1})
    def total(array):
        return int(array.sum())

    big = ray.put(np.ones(3_000_000, dtype=np.uint8))     # in the head node's store
    gate = tmp_path / "open"
    ref = total.options(runtime_env={
        "worker_process_setup_hook": _hold_until_gate_opens,
        "env_vars": {"PREFETCH_GATE": str(gate)}}).remote(big)
    copy = f"/dev/shm/meshray-{second.node_id[:12]}/{big.hex()}"
    try:
        # The worker is held before it reads any argument: only the node can
        # have started this copy.
        wait_for(lambda: os.path.exists(copy), timeout=30,
                 message="the argument's copy reaches the node running the task")
    finally:
        gate.touch()
    assert ray.get(ref, timeout=60) == 3_000_000
