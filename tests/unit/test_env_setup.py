"""The node's runtime-environment setup (node/env_setup.py), with stand-in collaborators.

EnvSetup is given its worker pool, a reader of package bytes, its log sinks
and the callback for a setup's end, so these tests drive it without a daemon:
plain environments start workers at once, a failed setup reports a
RuntimeEnvSetupError once and can be tried again, idle environment workers
are reclaimed.
"""
from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from meshray import exceptions
from meshray.node.env_setup import IDLE_ENV_WORKER_TIMEOUT_S, EnvSetup

JOB = bytes.fromhex("0a0b0c0d")


class _Pool:
    def __init__(self):
        self.started = []
        self.killed = []
        self.idle = {}

    def start(self, worker_id, key, env, **kwargs):
        self.started.append((key, dict(env)))
        return SimpleNamespace(worker_id=worker_id)

    def kill(self, worker):
        self.killed.append(worker)


class _Sinks:
    def __init__(self):
        self.files = {}
        self.delivered = []

    def append(self, name, data):
        self.files[name] = self.files.get(name, b"") + data

    def deliver(self, job_hex, lines):
        self.delivered.append((job_hex, [line.text for line in lines]))
        return True


def _task(runtime_env, packages=None, key="env-1"):
    return SimpleNamespace(runtime_env=runtime_env, packages=packages or {}, worker_key=key,
                           worker_env={"A": "1"}, spec=SimpleNamespace(job_id=JOB))


def _envs(pool, sinks, ended, object_bytes=None):
    async def no_bytes(object_id):
        raise AssertionError("a plain environment reads no package")

    def no_upload(uri):
        raise AssertionError("these tasks name no uploaded package")

    return EnvSetup(pool=lambda: pool, object_bytes=object_bytes or no_bytes,
                    uploaded_bytes=no_upload, log_writer=sinks, log_streams=sinks,
                    setup_ended=lambda key, error: ended.append((key, error)))


def test_an_environment_without_setup_starts_its_workers_at_once():
    pool, sinks, ended = _Pool(), _Sinks(), []
    _envs(pool, sinks, ended).start_workers_for(_task({"env_vars": {"A": "1"}}), 2)
    assert pool.started == [("env-1", {"A": "1"})] * 2
    assert ended == []          # nothing was set up, so nothing ends


def test_a_failed_setup_reports_one_error_and_may_be_tried_again():
    pool, sinks, ended = _Pool(), _Sinks(), []
    reads = []

    async def unreachable(object_id):
        reads.append(object_id)
        raise ConnectionError("peer gone")

    task = _task({"working_dir": "gcs://pkg.zip"}, {"gcs://pkg.zip": "ab" * 4})

    async def main():
        envs = _envs(pool, sinks, ended, unreachable)
        envs.start_workers_for(task, 2)
        envs.start_workers_for(task, 1)        # under way: not started twice
        deadline = time.monotonic() + 10
        while not ended and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        envs.start_workers_for(task, 1)        # ended: a new attempt starts
        while len(ended) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert reads == [bytes.fromhex("ab" * 4)] * 2 and pool.started == []
    key, error = ended[0]
    assert key == "env-1" and isinstance(error, exceptions.RuntimeEnvSetupError)
    assert "ConnectionError: peer gone" in str(error)
    assert b"runtime_env setup failed" in sinks.files[f"runtime_env_setup-{JOB.hex()}.log"]
    assert sinks.delivered[0][0] == JOB.hex()


def test_idle_environment_workers_are_reclaimed_but_default_ones_stay():
    pool, sinks, ended = _Pool(), _Sinks(), []
    old = time.monotonic() - IDLE_ENV_WORKER_TIMEOUT_S - 1
    stale, fresh, default = (SimpleNamespace(idle_since=old),
                             SimpleNamespace(idle_since=time.monotonic()),
                             SimpleNamespace(idle_since=old))
    pool.idle = {"env-1": [stale, fresh], "default": [default]}
    _envs(pool, sinks, ended).reclaim_idle_workers()
    assert pool.killed == [stale]
    assert pool.idle == {"env-1": [fresh], "default": [default]}
