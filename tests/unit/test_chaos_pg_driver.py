"""A racing placement-group driver of the chaos harness stops when its run
is over, even when the run was interrupted and never wrote its stop file."""
from __future__ import annotations

import os
import subprocess
import sys

from chaos.workloads import run_over
from tests.helpers import REPO, wait_for


def test_a_driver_runs_until_the_stop_file_appears(tmp_path):
    stop = tmp_path / "pg-stop"
    assert not run_over(str(stop), os.getppid())
    stop.touch()
    assert run_over(str(stop), os.getppid())


def test_a_driver_stops_when_its_run_dir_is_gone_or_its_parent_exited(tmp_path):
    assert run_over(str(tmp_path / "gone" / "pg-stop"), os.getppid())
    # Orphaned: the process that started it exits without writing the stop
    # file; the child (whose run dir still exists) then writes its verdict.
    verdict = tmp_path / "verdict"
    code = ("import os, time\n"
            "from chaos.workloads import run_over\n"
            "if os.fork() == 0:\n"
            "    parent = os.getppid()\n"
            f"    before = run_over({str(tmp_path / 'pg-stop')!r}, parent)\n"
            "    deadline = time.monotonic() + 20\n"
            "    while os.getppid() == parent and time.monotonic() < deadline:\n"
            "        time.sleep(0.01)\n"
            f"    after = run_over({str(tmp_path / 'pg-stop')!r}, parent)\n"
            f"    open({str(verdict)!r}, 'w').write(f'{{before}} {{after}}')\n"
            "    os._exit(0)\n")
    started = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                             text=True, timeout=30)
    assert started.returncode == 0, started.stderr
    wait_for(lambda: verdict.exists() and verdict.read_text(), timeout=20,
             message="the orphaned child's verdict")
    assert verdict.read_text() == "False True"
