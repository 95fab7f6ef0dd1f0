"""`meshray microbenchmark --quick` end to end, against meshray only.

It proves that every row runs (or says n/a with a reason) and that the run
cleans up after itself. It never judges speed: the CI machines are 2 noisy
cores, and the numbers from --quick are single cold samples anyway.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import psutil
import pytest

from meshray.bench.workloads import ROW_NAMES
from meshray.cli import microbenchmark as mb

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEST_MARKER = "MESHRAY_BENCH_TEST_ID"


def _processes_with(marker: str) -> list:
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get(TEST_MARKER) == marker:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def _run_cli(tmp_path, *extra, timeout=50):
    """Run the standalone module in a fresh interpreter; returns (process, report)."""
    marker = uuid.uuid4().hex
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    env[TEST_MARKER] = marker
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "meshray.cli.microbenchmark", "--quick", "--num-cpus", "2",
             "--row-timeout", "30", "--json", str(out), *extra],
            capture_output=True, text=True, timeout=timeout, cwd=str(tmp_path), env=env)
    finally:
        leftovers = _processes_with(marker)
        for leftover in leftovers:
            leftover.kill()
    assert not leftovers, f"processes left behind: {[p.pid for p in leftovers]}"
    report = json.loads(out.read_text()) if out.exists() else None
    return proc, report


def test_quick_run_reports_every_row(tmp_path):
    proc, report = _run_cli(tmp_path, timeout=150)
    assert report is not None, proc.stdout + proc.stderr
    rows = report["runtimes"]["meshray"]["rows"]
    assert [r["name"] for r in rows] == ROW_NAMES
    for row in rows:
        assert set(row) >= {"name", "unit", "value", "runs", "samples", "error", "status"}
        if row["status"] == "n/a":
            # A missing feature must say which one.
            assert row["error"] and row["value"] is None, row
            continue
        assert row["status"] == "ok", f"{row['name']}: {row['error']}\n" \
                                      f"{row['details'].get('traceback', '')}"
        assert row["value"] > 0 and row["runs"] == len(row["samples"]) >= 1, row
        assert all(s > 0 for s in row["samples"]), row
    # The tasks/objects core is there today; these rows must never be n/a.
    core_rows = {"single client tasks sync", "single client put calls (Plasma Store)",
                 "single client get calls (Plasma Store)", "init to first result"}
    assert all(r["status"] == "ok" for r in rows if r["name"] in core_rows)
    by_name = {r["name"]: r for r in rows}
    # A fresh runtime is at least the driver, etcd, a node daemon and a worker.
    assert by_name["idle memory of a fresh local runtime"]["details"]["processes"][0] >= 4
    for readers in (1, 2, 4):
        row = next(r for r in rows if r["name"].startswith(f"1 GiB object transfer, {readers} "))
        assert [len(times) for times in row["details"]["reader_seconds"]] == [readers], row
        assert len(set(row["details"]["node_ids"])) == readers + 1, row
    # Every node a multi-node row started is gone, its object store included.
    node_ids = [n for r in rows for n in r["details"].get("node_ids", [])]
    assert node_ids and all(node_ids)
    left = [n for n in node_ids if os.path.exists(f"/dev/shm/meshray-{n[:12]}")]
    assert not left, f"object stores left behind by nodes {left}"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "single client tasks sync" in proc.stdout


def test_rows_filter_and_markdown_block(tmp_path):
    doc = tmp_path / "perf.md"
    doc.write_text(f"# Title\n\nbefore\n\n{mb.TABLE_BEGIN}\nold table\n{mb.TABLE_END}\n\nafter\n")
    proc, report = _run_cli(tmp_path, "--rows", "put calls", "--markdown", str(doc))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [r["name"] for r in report["runtimes"]["meshray"]["rows"]] == [
        "single client put calls (Plasma Store)"]
    text = doc.read_text()
    assert text.startswith("# Title\n\nbefore\n\n") and text.endswith("\n\nafter\n")
    assert "old table" not in text and "| single client put calls (Plasma Store) |" in text


def test_compare_is_unit_aware():
    def row(name, unit, value):
        return {"name": name, "unit": unit, "status": "ok", "value": value, "samples": [value],
                "runs": 1, "error": None, "details": {}}

    mesh = [row("a", "ops/s", 200.0), row("b", "s", 2.0), row("c", "ops/s", 100.0)]
    ray = [row("a", "ops/s", 100.0), row("b", "s", 1.0), row("c", "ops/s", 95.0)]
    result = {c["name"]: c for c in mb.compare(mesh, ray)}
    assert result["a"]["ratio"] == pytest.approx(2.0) and result["a"]["better"] == "meshray"
    # For seconds, a larger meshray value is worse.
    assert result["b"]["ratio"] == pytest.approx(2.0) and result["b"]["better"] == "Ray"
    assert result["c"]["better"] == "≈"
