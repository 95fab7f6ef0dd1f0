"""`meshray microbenchmark`: the same workloads, timed on meshray and on Ray.

The package is split so that the Ray side never needs meshray's own
dependencies: the workload modules and `runner` import only the standard
library, numpy and the runtime under test, and `runner` can be run as a plain
file by an interpreter that has Ray but not grpc, cloudpickle or etcd clients.

`workloads` is imported here, and it imports the other workload modules in
the order it lists them: whichever module a caller imports first, the rows
then register in that one order, the order the Ray side's by-path load gives.
"""
from meshray.bench import workloads  # noqa: F401 - see the docstring

__all__: list[str] = []
