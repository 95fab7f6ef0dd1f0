"""ray.util.multiprocessing.Pool on a real cluster, with the standard
library's Pool semantics."""
from __future__ import annotations

import os
import sys
import threading

import cloudpickle
import pytest

from meshray.util.multiprocessing import Pool, TimeoutError as PoolTimeoutError

# The pool's processes get this module's functions by value: they need not
# be able to import the tests package.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Boom(Exception):
    pass


def _set_marker(value):
    os.environ["POOL_MARKER"] = value


def _read_marker(_):
    return os.environ.get("POOL_MARKER")


def _square(x):
    return x * x


def _fail_on_three(x):
    if x == 3:
        raise Boom(f"bad item {x}")
    return x


@pytest.fixture(scope="module")
def pool(ray):
    with Pool(processes=2, initializer=_set_marker, initargs=("ready",)) as p:
        yield p


def test_map_starmap_and_apply_return_results_in_order(pool):
    assert pool.map(_square, range(10)) == [x * x for x in range(10)]
    assert pool.map(_square, range(7), chunksize=3) == [x * x for x in range(7)]
    assert pool.starmap(pow, [(2, 3), (3, 2)]) == [8, 9]
    assert pool.apply(divmod, (7, 2)) == (3, 1)
    assert pool.apply(int, ("ff",), {"base": 16}) == 255
    assert pool.map(_square, []) == []


def test_initializer_runs_in_every_process(pool):
    assert set(pool.map(_read_marker, range(8), chunksize=1)) == {"ready"}


def test_imap_is_in_order_and_imap_unordered_has_every_result(pool):
    assert list(pool.imap(_square, range(9), chunksize=2)) == [x * x for x in range(9)]
    assert sorted(pool.imap_unordered(_square, range(9))) == sorted(x * x for x in range(9))


def test_apply_async_error_surfaces_on_get(pool):
    result = pool.apply_async(_fail_on_three, (3,))
    result.wait(timeout=60)
    assert result.ready()
    assert not result.successful()
    with pytest.raises(Boom, match="bad item 3"):
        result.get(timeout=60)
    with pytest.raises(Boom):
        pool.map(_fail_on_three, range(5))
    items = pool.imap(_fail_on_three, range(5))
    assert [next(items) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(Boom):
        next(items)


def test_async_results_callbacks_and_timeouts(pool):
    got, errors = [], []
    done = threading.Event()

    def on_result(value):
        got.append(value)
        done.set()

    mapped = pool.map_async(_square, range(4), callback=on_result)
    assert mapped.get(timeout=60) == [0, 1, 4, 9]
    assert done.is_set() and got == [[0, 1, 4, 9]]
    assert mapped.successful()
    failed = pool.starmap_async(_fail_on_three, [(3,)], error_callback=errors.append)
    with pytest.raises(Boom):
        failed.get(timeout=60)
    assert len(errors) == 1 and isinstance(errors[0], Boom)


def test_get_times_out_and_successful_needs_a_ready_result(pool, tmp_path):
    release = tmp_path / "release"
    slow = pool.apply_async(_wait_for_file, (str(release),))
    with pytest.raises(PoolTimeoutError):
        slow.get(timeout=0.05)
    assert not slow.ready()
    with pytest.raises(ValueError, match="not ready"):
        slow.successful()
    release.write_text("go")
    assert slow.get(timeout=60) == str(release)


def _wait_for_file(path):
    # A condition the test controls: the call ends once the file exists.
    import time
    while not os.path.exists(path):
        time.sleep(0.02)
    return path


def test_maxtasksperchild_replaces_processes(ray):
    with Pool(processes=1, maxtasksperchild=1) as p:
        pids = [p.apply(os.getpid) for _ in range(3)]
    assert len(set(pids)) == 3


def test_close_join_and_terminate(ray):
    p = Pool(processes=1)
    result = p.map_async(_square, range(3))
    with pytest.raises(ValueError, match="still running"):
        p.join()
    p.close()
    with pytest.raises(ValueError, match="Pool not running"):
        p.map(_square, [1])
    p.join()
    assert result.ready() and result.get() == [0, 1, 4]
    q = Pool(processes=1)
    q.terminate()
    with pytest.raises(ValueError, match="Pool not running"):
        q.apply(_square, (2,))


def test_apply_takes_rays_kwargs_and_the_standard_librarys_kwds(pool):
    assert pool.apply(int, ("ff",), kwargs={"base": 16}) == 255         # Ray's name
    assert pool.apply(int, ("ff",), kwds={"base": 16}) == 255           # the standard library's
    assert pool.apply_async(int, ("11",), kwargs={"base": 2}).get(timeout=60) == 3
    assert pool.apply_async(int, ("11",), kwds={"base": 8}).get(timeout=60) == 9
    for method in (pool.apply, pool.apply_async):
        with pytest.raises(TypeError, match=r"got the keyword arguments twice, as "
                                            r"kwargs=\{'base': 16\} and kwds=\{'base': 8\}"):
            method(int, ("11",), kwargs={"base": 16}, kwds={"base": 8})


def test_more_processes_than_the_clusters_cpus_is_refused(ray):
    cpus = int(ray.cluster_resources()["CPU"])
    with pytest.raises(ValueError, match=rf"processes={cpus + 1}\) asks for {cpus + 1} "
                                         rf"processes, but the cluster has only {cpus} CPUs"):
        Pool(processes=cpus + 1)
    with Pool(processes=cpus) as p:             # one per CPU is fine
        assert p.map(_square, range(3)) == [0, 1, 4]


def test_pool_made_before_init_starts_a_cluster_with_one_cpu_per_process():
    from tests.helpers import run_driver
    env = {k: v for k, v in os.environ.items() if k not in ("MESHRAY_ADDRESS", "RAY_ADDRESS")}
    out = run_driver(
        "import meshray\n"
        "from meshray.util.multiprocessing import Pool\n"
        "assert not meshray.is_initialized()\n"
        "with Pool(processes=3) as pool:\n"
        "    print(meshray.cluster_resources()['CPU'], pool.apply(divmod, (7, 2)))\n"
        "meshray.shutdown()\n", timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["3.0 (3, 1)"]


def test_bad_arguments_name_themselves(ray):
    with pytest.raises(ValueError, match="processes"):
        Pool(processes=0)
    with pytest.raises(TypeError, match="initializer"):
        Pool(processes=1, initializer=5)
    with pytest.raises(ValueError, match="maxtasksperchild"):
        Pool(processes=1, maxtasksperchild=0)
