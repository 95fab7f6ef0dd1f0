"""`meshray microbenchmark`: the same workloads, timed on meshray and on Ray.

The package is split so that the Ray side never needs meshray's own
dependencies: `workloads` and `runner` import only the standard library, numpy
and the runtime under test, and `runner` can be run as a plain file by an
interpreter that has Ray but not grpc, cloudpickle or etcd clients. Nothing is
imported here for the same reason.
"""

__all__: list[str] = []
