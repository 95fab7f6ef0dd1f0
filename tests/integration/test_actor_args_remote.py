"""Large actor-call arguments to an actor on another node travel inline as an image."""
from __future__ import annotations

import hashlib
import os
import sys

import cloudpickle
import numpy as np

from meshray.common import arg_dir

cloudpickle.register_pickle_by_value(sys.modules[__name__])

MIB = 1024 * 1024


def _digest(value) -> str:
    if isinstance(value, np.ndarray):
        value = np.ascontiguousarray(value).tobytes()
    return hashlib.sha256(value).hexdigest()


def test_large_args_to_an_actor_on_another_node(cluster):
    far = cluster.add_node(num_cpus=1, resources={"far": 1})
    ray = cluster.connect()

    @ray.remote(num_cpus=0, resources={"far": 1})
    class Remote:
        def where(self):
            return ray.get_runtime_context().get_node_id()

        def describe(self, array, payload):
            return (_digest(array), array.flags.writeable, array.shape,
                    _digest(payload), type(payload).__name__)

    actor = Remote.remote()
    assert ray.get(actor.where.remote(), timeout=60) == far.node_id
    rng = np.random.default_rng(2)
    arrays = [rng.standard_normal((256, 512 + i)) for i in range(5)]
    payload = os.urandom(MIB)
    results = ray.get([actor.describe.remote(a, payload) for a in arrays], timeout=60)
    assert results == [(_digest(a), False, a.shape, _digest(payload), "bytes")
                       for a in arrays]
    # Nothing was written to this node's shared memory for them.
    from meshray.core.state import state
    args = arg_dir.args_dir(state.core.store_dir)
    assert not os.path.isdir(args) or os.listdir(args) == []
