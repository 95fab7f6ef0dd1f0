"""`meshray debug dump-events` writes what a running node's lifecycles did."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from meshray import security
from tests.helpers import run_python

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.timeout(180)

DRIVER = """
import meshray as ray
ray.init(address="auto", log_to_driver=False)

@ray.remote
def square(x):
    return x * x

@ray.remote
class Counter:
    def __init__(self):
        self.n = 0
    def add(self):
        self.n += 1
        return self.n

assert ray.get([square.remote(i) for i in range(3)]) == [0, 1, 4]
counter = Counter.remote()
assert ray.get(counter.add.remote()) == 1
print("ACTOR", counter._actor_id.hex())
ray.kill(counter)
ray.shutdown()
"""


def test_dump_events_writes_task_and_actor_moves(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in (security.TOKEN_ENV, security.TOKEN_FILE_ENV)}
    env["MESHRAY_RUN_DIR"] = str(tmp_path / "run")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    # The node's own tasks: one pushed on a worker lease never passes the node.
    env["MESHRAY_WORKER_LEASES"] = "0"
    cli = [sys.executable, "-m", "meshray.cli.main"]
    started = subprocess.run(cli + ["start", "--num-cpus", "2"], capture_output=True, text=True,
                             env=env, timeout=60, cwd=REPO)
    try:
        assert started.returncode == 0, started.stderr
        driver = run_python(["-c", DRIVER], timeout=90, env=env)
        assert driver.returncode == 0, driver.stderr
        actor_id = next(line.split()[1] for line in driver.stdout.splitlines()
                        if line.startswith("ACTOR"))
        out = tmp_path / "events.jsonl"
        dumped = run_python(["-m", "meshray.cli.main", "debug", "dump-events", "--output",
                             str(out)], timeout=60, env=env)
        assert dumped.returncode == 0, dumped.stderr
        events = [json.loads(line) for line in out.read_text().splitlines()]
        assert "event(s) written" in dumped.stderr
        assert [e["time"] for e in events] == sorted(e["time"] for e in events)
        finished = [e for e in events if e["kind"] == "task" and e["to"] == "done"]
        assert len(finished) >= 4          # three tasks, the actor's creation (and its call path)
        assert {e["from"] for e in events if e["kind"] == "task"} >= {"waiting", "running"}
        actor = [(e["from"], e["to"]) for e in events
                 if e["kind"] == "actor" and e["id"] == actor_id]
        assert actor[0] == ("PENDING", "ALIVE") and actor[-1][1] == "DEAD", actor
        last = run_python(["-m", "meshray.cli.main", "debug", "dump-events", "--last", "2"],
                          timeout=60, env=env)
        assert last.returncode == 0, last.stderr
        # Attaching a driver moves no task or actor, so the log has not changed.
        assert [json.loads(line) for line in last.stdout.splitlines()] == events[-2:]
        bad = run_python(["-m", "meshray.cli.main", "debug", "dump-events", "--last", "-1"],
                         timeout=60, env=env)
        assert bad.returncode == 2 and "--last=-1 must be >= 0" in bad.stderr
    finally:
        subprocess.run(cli + ["stop"], capture_output=True, env=env, timeout=60, cwd=REPO)
