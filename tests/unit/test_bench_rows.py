"""The pure parts of the latency, idle-memory and concurrent-reader bench rows,
the unit-aware comparison their units need, and the module seam that makes
them part of the one row list on both runtimes."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from meshray.bench import cluster_workloads, latency_workloads, workloads
from meshray.cli import microbenchmark as mb

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _row(name, unit, value):
    return {"name": name, "unit": unit, "status": "ok", "value": value, "samples": [value],
            "runs": 1, "error": None, "details": {}}


def test_compare_treats_ms_and_mb_as_lower_is_better():
    mesh = [_row("lat", "ms", 1.0), _row("mem", "MB", 700.0), _row("near", "ms", 1.05),
            _row("rate", "ops/s", 50.0)]
    ray = [_row("lat", "ms", 2.0), _row("mem", "MB", 200.0), _row("near", "ms", 1.0),
           _row("rate", "ops/s", 100.0)]
    result = {c["name"]: c for c in mb.compare(mesh, ray)}
    assert result["lat"]["ratio"] == pytest.approx(0.5) and result["lat"]["better"] == "meshray"
    assert result["mem"]["ratio"] == pytest.approx(3.5) and result["mem"]["better"] == "Ray"
    assert result["near"]["better"] == "≈"
    assert result["rate"]["better"] == "Ray"


def test_every_row_unit_is_a_rate_or_lower_is_better():
    rates = {"ops/s", "GB/s"}
    units = {w.unit for w in workloads.WORKLOADS}
    assert units <= rates | workloads.LOWER_IS_BETTER, units
    assert {"ms", "MB"} <= units


def test_latency_values_are_printed_with_three_significant_digits():
    assert mb._fmt(0.5764, "ms") == "0.576"
    assert mb._fmt(12.345, "ms") == "12.3"
    assert mb._fmt(212.4, "MB") == "212"


def test_percentile_is_nearest_rank():
    values = list(range(100, 0, -1))           # 1..100, unsorted
    assert latency_workloads.percentile(values, 50) == 50
    assert latency_workloads.percentile(values, 99) == 99
    assert latency_workloads.percentile(values, 100) == 100
    # 50 calls (--quick): p99 is the slowest call, never an interpolated value.
    assert latency_workloads.percentile([0.5] * 49 + [7.0], 99) == 7.0
    assert latency_workloads.percentile([3.0], 50) == 3.0


@pytest.mark.parametrize("values, pct, words", [
    ([], 50, "at least one value"),
    ([1.0], 0, "pct must be in (0, 100], got 0"),
    ([1.0], 101, "pct must be in (0, 100], got 101"),
])
def test_percentile_rejects_bad_input(values, pct, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        latency_workloads.percentile(values, pct)


def test_latency_rows_are_p50_and_p99_of_tasks_and_actor_calls():
    names = [w.name for w in workloads.WORKLOADS if w.unit == "ms"]
    assert names == ["single client task round trip p50", "single client task round trip p99",
                     "1:1 actor call round trip p50", "1:1 actor call round trip p99"]


def test_descendants_walks_the_whole_tree_and_nothing_else():
    parents = {10: 1, 11: 10, 12: 10, 13: 11, 20: 1, 21: 20}
    assert sorted(cluster_workloads.descendants(10, parents)) == [10, 11, 12, 13]
    assert cluster_workloads.descendants(13, parents) == [13]


def test_process_tree_from_proc_includes_grandchildren():
    # A child that starts a grandchild and says its pid: the reading must hold both.
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess, sys; p = subprocess.Popen(['sleep', '30']); "
         "print(p.pid, flush=True); sys.stdin.read(); p.kill(); p.wait()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(child.stdout.readline())
        pids, rss = cluster_workloads._tree_reading(os.getpid())
        assert {os.getpid(), child.pid, grandchild} <= pids
        assert rss > 0
    finally:
        child.stdin.close()
        child.wait(timeout=30)


def test_settled_needs_a_quiet_window_of_one_process_set():
    a, b = frozenset({1, 2}), frozenset({1, 2, 3})
    quiet = 2.0
    # Not watched for long enough yet.
    assert not cluster_workloads.settled([(0.0, a, 100), (1.0, a, 100)], quiet)
    # A process appeared inside the window.
    assert not cluster_workloads.settled([(0.0, a, 100), (1.5, a, 100), (2.0, b, 100),
                                          (3.0, b, 100)], quiet)
    # The same processes, but still growing (a worker importing).
    assert not cluster_workloads.settled([(0.0, b, 100), (1.5, b, 150), (3.0, b, 200)], quiet)
    # A change between the last reading before the window and the first in it.
    assert not cluster_workloads.settled([(0.5, a, 100), (1.5, b, 100), (3.0, b, 100)], quiet)
    # Changes before the window do not count; small RSS jitter does not either.
    assert cluster_workloads.settled(
        [(0.0, a, 50), (0.5, b, 200), (1.5, b, 201), (2.5, b, 200)], quiet)
    assert not cluster_workloads.settled([], quiet)


def test_concurrent_reader_rows_exist_for_one_two_and_four_readers():
    rows = [w for w in workloads.WORKLOADS if "concurrent reader" in w.name]
    assert [w.name for w in rows] == ["1 GiB object transfer, 1 concurrent reader",
                                      "1 GiB object transfer, 2 concurrent readers",
                                      "1 GiB object transfer, 4 concurrent readers"]
    assert all(w.unit == "GB/s" and not w.needs_session for w in rows)


def test_rows_load_by_path_without_meshray_as_on_the_ray_side(tmp_path):
    # The Ray side runs runner.py as a file in an interpreter without meshray's
    # dependencies: every workload module must load there, into the same list.
    script = (
        "import importlib.util, json, sys\n"
        "sys.modules['meshray'] = None  # importing meshray must fail here\n"
        f"spec = importlib.util.spec_from_file_location('r', {os.path.join(REPO, 'meshray', 'bench', 'runner.py')!r})\n"
        "runner = importlib.util.module_from_spec(spec); spec.loader.exec_module(runner)\n"
        "w = runner._load_workloads()\n"
        "print(json.dumps({'rows': w.ROW_NAMES, 'probes': sorted(w.PROBES)}))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded["rows"] == workloads.ROW_NAMES
    assert loaded["probes"] == ["idle memory", "init"]
