"""The pure parts of `meshray scale-test`: percentiles, detection latencies,
task-result checks, the decision p99 from a histogram, the table, and the
host's argument errors."""
from __future__ import annotations

import pytest

from meshray.scale import scale_test
from meshray.scale.host import parse_args


def test_percentile_is_nearest_rank_and_none_when_empty():
    assert scale_test.percentile([], 99) is None
    values = [float(i) for i in range(1, 101)]
    assert scale_test.percentile(values, 50) == 50.0
    assert scale_test.percentile(values, 99) == 99.0
    assert scale_test.percentile([3.0, 1.0, 2.0], 100) == 3.0


def test_detection_latencies_count_every_observer_and_every_miss():
    killed = {"k1": 100.0, "k2": 100.5}
    deaths = {
        "a": {"k1": 101.0, "k2": 102.5},
        "b": {"k1": 103.0},                 # never saw k2
        "k2": {"k1": 100.2},                # killed itself: not an observer
    }
    latencies, missed = scale_test.detection_latencies(killed, deaths)
    assert sorted(latencies) == [1.0, 2.0, 3.0]
    assert missed == 1


def test_check_tasks_accepts_real_and_hollow_results_only():
    hollow = {"n1", "n2"}
    values = [["real", 0], ["hollow", "n1"], ("hollow", "n2"), ["real", 7], ["hollow", "zz"]]
    good, bad, by_node = scale_test.check_tasks(values, hollow)
    assert good == 3
    assert bad == [(3, ("real", 7)), (4, ("hollow", "zz"))]
    assert by_node == {"real": 1, "n1": 1, "n2": 1}


def test_p99_is_the_bound_of_the_bucket_holding_it():
    from meshray.scale.drivers import p99_from_buckets
    inf = float("inf")
    assert p99_from_buckets({}) is None
    assert p99_from_buckets({0.001: 0, inf: 0}) is None            # nothing observed
    # 1,000 decisions: 980 within 0.1 ms, 995 within 1 ms, all within 10 ms.
    buckets = {0.0001: 980, 0.001: 995, 0.01: 1000, inf: 1000}
    assert p99_from_buckets(buckets) == 0.001
    assert p99_from_buckets({0.0001: 1000, inf: 1000}) == 0.0001
    assert p99_from_buckets({0.0001: 5, inf: 1000}) == inf         # past the last bound


def test_table_shows_unmeasured_results_as_dashes():
    result = {key: None for key in scale_test.RESULT_KEYS}
    result.update(nodes=100, join_s=12.3456)
    table = scale_test.render_table(result)
    assert "join_s" in table and "12.346" in table
    line = next(row for row in table.splitlines() if row.startswith("many_actors_per_s"))
    assert line.split()[-1] == "-"


@pytest.mark.parametrize("flag,value", [("--nodes", "0"), ("--cpus", "-1"), ("--task-s", "x")])
def test_host_refuses_bad_numbers_naming_the_flag(flag, value, capsys):
    argv = ["--nodes", "2", "--address", "127.0.0.1:1", "--base-dir", "/nonexistent"]
    with pytest.raises(SystemExit):
        parse_args(argv + [flag, value])
    assert f"{flag}={value!r}" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value,expected", [
    ("--nodes", "0", "a whole number >= 1"), ("--actors", "many", "a whole number >= 1"),
    ("--cpus", "-3", "a number > 0"), ("--actor-cpus", "0", "a number > 0"),
    ("--join-rate", "x", "a number >= 0"), ("--task-s", "-1", "a number >= 0")])
def test_scale_test_refuses_bad_numbers_naming_the_flag(flag, value, expected, capsys):
    from meshray.cli.main import build_parser
    with pytest.raises(SystemExit):
        build_parser().parse_args(["scale-test", flag, value])
    assert f"{flag}={value!r}: expected {expected}" in capsys.readouterr().err


def test_a_host_lengthens_grpcs_wait_slice(monkeypatch):
    from grpc import _common

    from meshray.scale import host
    monkeypatch.setattr(_common, "MAXIMUM_WAIT_TIMEOUT", 0.1)
    assert host._lengthen_grpc_wait_slice(1.5) is True
    assert _common.MAXIMUM_WAIT_TIMEOUT == 1.5
    monkeypatch.delattr(_common, "MAXIMUM_WAIT_TIMEOUT")
    assert host._lengthen_grpc_wait_slice(1.5) is False
