"""tqdm_ray: bars made in a task and an actor are drawn by the driver."""
from __future__ import annotations

from meshray.common.progress_bar import BAR_MARKER
from tests.helpers import run_driver


def test_remote_bars_show_their_final_state_once_in_the_driver_output():
    code = """
import meshray
from meshray.core.progress_bars import PRINTER
from meshray.experimental import tqdm_ray
from tests.helpers import wait_for
meshray.init(num_cpus=1)

@meshray.remote
def work(steps):
    bar = tqdm_ray.tqdm(total=steps, desc="task steps", flush_interval_s=0.001)
    for _ in range(steps):
        bar.update(1)
    bar.close()
    print("task printed a line")
    return steps

@meshray.remote(num_cpus=0)
class Looper:
    def run(self, items):
        return sum(tqdm_ray.tqdm(items, desc="actor loop", unit="item"))

assert meshray.get(work.remote(7)) == 7
assert meshray.get(Looper.remote().run.remote(list(range(5)))) == 10
wait_for(lambda: PRINTER.finished >= 2, message="both bars closed in the driver")
print("DRIVER DONE", flush=True)
meshray.shutdown()
"""
    result = run_driver(code, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert BAR_MARKER not in out and BAR_MARKER not in result.stderr
    task_bars = [line for line in out.splitlines() if "task steps:" in line]
    assert len(task_bars) == 1 and task_bars[0].startswith("(work pid=")
    assert "100%|" in task_bars[0] and "| 7/7 [" in task_bars[0]
    actor_bars = [line for line in out.splitlines() if "actor loop:" in line]
    assert len(actor_bars) == 1 and actor_bars[0].startswith("(Looper pid=")
    assert "| 5/5 [" in actor_bars[0] and "item/s]" in actor_bars[0]
    assert "task printed a line" in out and "DRIVER DONE" in out
