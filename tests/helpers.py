"""Helpers the tests share: waiting on conditions, running driver scripts."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05, message: str = ""):
    """Poll `predicate` until it is truthy or the deadline passes (then fail)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s: {message or predicate}")


def run_python(args: list, timeout: float = 60.0, env=None) -> subprocess.CompletedProcess:
    """Run `python *args` in a fresh interpreter and return its outcome.

    Past `timeout` the process is sent SIGABRT with Python's fault handler on,
    so the failure shows where every one of its threads was stuck (a hang
    explains itself instead of only saying that it took too long).
    """
    env = dict(os.environ if env is None else env, PYTHONFAULTHANDLER="1")
    with subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=REPO, env=env) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)
            try:
                out, err = process.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                out, err = process.communicate()
            raise AssertionError(
                f"python {' '.join(map(str, args))[:200]} still running after {timeout}s; "
                f"its threads when stopped:\n{err[-12000:]}\nits stdout:\n{out[-2000:]}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def run_driver(code: str, timeout: float = 60.0, env=None) -> subprocess.CompletedProcess:
    """Run a driver script in a fresh interpreter and return its outcome."""
    return run_python(["-c", code], timeout=timeout, env=env)


class RecordingDispatch:
    """A node's `dispatch` for unit tests of the parts around it: the real
    state machine (`NodeState`, on the node's own queue and resources), with
    the events it was handed and the instructions it returned kept. An
    instruction is carried out only by what a test puts in `carry_out`
    (instruction type -> callable). `schedules` counts the times the node was
    asked to start what fits."""

    def __init__(self, queue, resources=None, bundles=None):
        from meshray.node.state import NodeState
        from meshray.scheduler.resources import NodeResources
        self.machine = NodeState(resources=resources or NodeResources({"CPU": 0.0}),
                                 queue=queue, bundles=bundles)
        self.events, self.instructions = [], []
        self.carry_out: dict = {}
        self.schedules = 0

    def handle(self, event) -> None:
        self.events.append(event)
        for instruction in self.machine.handle(event):
            self.instructions.append(instruction)
            carry_out = self.carry_out.get(type(instruction))
            if carry_out is not None:
                carry_out(instruction)

    def schedule(self) -> None:
        self.schedules += 1
