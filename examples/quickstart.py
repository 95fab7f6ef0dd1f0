"""meshray quickstart: tasks, objects and zero-copy numpy.

Runs unchanged on Ray if you swap the import for `import ray`.
"""
import time

import numpy as np

import meshray as ray

ray.init()  # no address: starts a private cluster (etcd + one node) for this script


@ray.remote
def square(x):
    return x * x


@ray.remote
def total(*values):
    return sum(values)


# Tasks run in parallel in worker processes; .remote() returns ObjectRefs at once.
refs = [square.remote(i) for i in range(10)]
print("squares:", ray.get(refs))

# ObjectRefs passed as arguments are resolved to their values before the task runs.
print("sum of squares:", ray.get(total.remote(*refs)))

# Large objects live in shared memory and are read without copying.
array = np.arange(20_000_000, dtype=np.float64)  # 160 MB
start = time.perf_counter()
ref = ray.put(array)
print(f"put 160 MB in {time.perf_counter() - start:.3f}s")
start = time.perf_counter()
view = ray.get(ref)
print(f"get 160 MB in {time.perf_counter() - start:.4f}s (zero-copy, read-only: "
      f"{not view.flags.writeable})")


@ray.remote
def array_sum(a):
    return float(a.sum())


print("sum computed in a worker:", ray.get(array_sum.remote(ref)))
print("cluster resources:", ray.cluster_resources())
ray.shutdown()
