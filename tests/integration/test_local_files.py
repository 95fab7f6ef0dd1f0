"""Node records and session files planted by another local user are refused.

The hostile files are written by a real second user (uid 65534, "nobody"),
through a shell started with that uid, in a scratch directory that is
world-writable and sticky like /tmp; the commands under test run with
TMPDIR pointing there, so their default run dir (<tmp>/meshray-run-<uid>)
is exactly the path an attacker on a shared machine can claim first.

The "victim" is a process of ours dressed as a node daemon (its command line
contains meshray.node.main); the control test shows `meshray stop` does
signal it when its record is genuine, so the refusals below are the
ownership checks at work and not a record that would never have matched.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile

import psutil
import pytest

from meshray import security
from tests.helpers import REPO, run_driver, wait_for

OTHER_UID = 65534
ME = os.getuid()
NODE_HEX = "ab" * 16
ATTACKER_TOKEN = "attacker-token-0123456789abcdef"

pytestmark = pytest.mark.timeout(180)


def as_other_user(script: str) -> None:
    """Run a shell script as uid/gid 65534 with no supplementary groups."""
    done = subprocess.run(["/bin/sh", "-c", script], user=OTHER_UID, group=OTHER_UID,
                          extra_groups=[], cwd="/", capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def shared_tmp():
    """A stand-in for /tmp: world-writable and sticky; removed (with all plants) afterwards."""
    if os.geteuid() != 0:
        pytest.skip("planting files as another local user needs root: the test switches to "
                    f"uid {OTHER_UID} to write them")
    path = tempfile.mkdtemp(prefix="meshray-shared-tmp-")
    os.chmod(path, 0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def victim():
    """A process of ours that looks like a node daemon to anyone reading its cmdline."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)",
                                "meshray.node.main"])
    wait_for(lambda: "meshray.node.main" in psutil.Process(process.pid).cmdline(), timeout=10)
    yield process
    if process.poll() is None:
        process.kill()
    process.wait()


def _env(tmpdir: str, run_dir: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MESHRAY_RUN_DIR"}
    env["TMPDIR"] = tmpdir
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    if run_dir is not None:
        env["MESHRAY_RUN_DIR"] = run_dir
    return env


def _record(pid: int, session_dir: str, **changes) -> dict:
    record = {"node_id": NODE_HEX, "pid": pid, "create_time": psutil.Process(pid).create_time(),
              "address": "127.0.0.1:1", "local_address": f"unix:{session_dir}/node.sock",
              "etcd": "127.0.0.1:2", "session_dir": session_dir, "cli": True,
              "embedded_etcd": False, "etcd_pid": None, "started_at": 0.0, "store_dir": ""}
    record.update(changes)
    return record


def _plant_script(run_dir: str, record: dict, session_dir: str) -> str:
    """Shell commands creating a run dir, a record and a session dir with a token."""
    return (f"umask 022 && mkdir -p '{run_dir}/nodes' '{session_dir}' && "
            f"cat > '{run_dir}/nodes/{NODE_HEX}.json' <<'EOF'\n{json.dumps(record)}\nEOF\n"
            f"printf '%s\\n' '{ATTACKER_TOKEN}' > '{session_dir}/token'")


def _stop(env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshray.cli.main", "stop", "--grace-period",
                           "5"], capture_output=True, text=True, env=env, cwd=REPO, timeout=60)


_AUTO = """
import meshray as ray
try:
    ray.init(address="auto", log_to_driver=False)
except Exception as exc:
    print("REFUSED", type(exc).__name__, exc)
else:
    print("JOINED")
    ray.shutdown()
"""


def _alive(process) -> bool:
    return process.poll() is None


# --------------------------------------------------------------------- control
def test_stop_signals_a_verified_daemon_record(tmp_path, victim):
    """Control: a genuine record (ours, private) for the victim does get it stopped."""
    run = tmp_path / "run"
    (run / "nodes").mkdir(parents=True, mode=0o700)
    run.chmod(0o700)
    session = tmp_path / "session"
    session.mkdir(mode=0o700)
    path = run / "nodes" / f"{NODE_HEX}.json"
    path.write_text(json.dumps(_record(victim.pid, str(session))))
    path.chmod(0o600)
    stopped = _stop(_env(str(tmp_path), str(run)))
    assert stopped.returncode == 0, stopped.stderr
    assert f"stopped meshray node {NODE_HEX} (pid {victim.pid})" in stopped.stdout
    assert victim.wait(10) == -signal.SIGTERM


# ------------------------------------------------------------ planted run dirs
def test_run_dir_planted_by_another_user_is_refused(shared_tmp, victim):
    run = os.path.join(shared_tmp, f"meshray-run-{ME}")
    session = os.path.join(shared_tmp, "attacker-session")
    as_other_user(_plant_script(run, _record(victim.pid, session), session))
    assert os.stat(run).st_uid == OTHER_UID
    # The attacker's "node": a socket that would see any connection attempt.
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(os.path.join(session, "node.sock"))
    listener.listen(8)
    listener.setblocking(False)
    env = _env(shared_tmp)
    try:
        stopped = _stop(env)
        assert stopped.returncode == 1
        assert f"refusing to use meshray run dir {run!r}" in stopped.stderr
        assert f"owned by uid {OTHER_UID}" in stopped.stderr and "mode 0755" in stopped.stderr
        assert f"expected a directory (not a symlink) owned by uid {ME}" in stopped.stderr
        assert _alive(victim)

        joined = run_driver(_AUTO, env=env)
        assert "REFUSED UnsafePathError" in joined.stdout, joined.stdout + joined.stderr
        assert f"refusing to use meshray run dir {run!r}" in joined.stdout
        with pytest.raises(BlockingIOError):
            listener.accept()              # nobody dialled the attacker's node

        started = subprocess.run([sys.executable, "-m", "meshray.cli.main", "start",
                                  "--num-cpus", "0"], capture_output=True, text=True,
                                 env=env, cwd=REPO, timeout=60)
        assert started.returncode != 0
        assert f"refusing to use meshray run dir {run!r}" in started.stdout + started.stderr
        assert os.listdir(os.path.join(run, "nodes")) == [f"{NODE_HEX}.json"]
    finally:
        listener.close()
    assert _alive(victim)


def test_symlinked_run_dir_is_refused_even_when_its_target_is_ours(shared_tmp, victim):
    """Another user's symlink to a directory of ours: the target would pass, the link must not."""
    target = os.path.join(shared_tmp, "ours")
    os.makedirs(os.path.join(target, "nodes"), mode=0o700)
    os.chmod(target, 0o700)
    session = os.path.join(shared_tmp, "our-session")
    os.mkdir(session, 0o700)
    record_path = os.path.join(target, "nodes", f"{NODE_HEX}.json")
    with open(record_path, "w") as handle:
        json.dump(_record(victim.pid, session), handle)
    os.chmod(record_path, 0o600)
    run = os.path.join(shared_tmp, f"meshray-run-{ME}")
    as_other_user(f"ln -s '{target}' '{run}'")
    env = _env(shared_tmp)
    stopped = _stop(env)
    assert stopped.returncode == 1
    assert f"refusing to use meshray run dir {run!r}: it is a symbolic link (owned by uid " \
           f"{OTHER_UID}" in stopped.stderr
    assert _alive(victim)
    joined = run_driver(_AUTO, env=env)
    assert "REFUSED UnsafePathError" in joined.stdout and "symbolic link" in joined.stdout


def test_world_writable_run_dir_of_ours_with_a_planted_record_is_refused(shared_tmp, victim):
    run = os.path.join(shared_tmp, "run")
    os.makedirs(os.path.join(run, "nodes"))
    os.chmod(run, 0o777)
    os.chmod(os.path.join(run, "nodes"), 0o777)
    session = os.path.join(shared_tmp, "attacker-session")
    as_other_user(_plant_script(run, _record(victim.pid, session), session))
    env = _env(shared_tmp, run)
    stopped = _stop(env)
    assert stopped.returncode == 1
    assert f"{run!r}: owned by uid {ME}" in stopped.stderr
    assert "mode 0777: writable by group/others" in stopped.stderr
    assert _alive(victim)
    joined = run_driver(_AUTO, env=env)
    assert "REFUSED UnsafePathError" in joined.stdout and "0777" in joined.stdout


# ----------------------------------------------------------------- the records
def test_world_writable_record_of_ours_is_refused(tmp_path, victim):
    run = tmp_path / "run"
    (run / "nodes").mkdir(parents=True, mode=0o700)
    run.chmod(0o700)
    session = tmp_path / "session"
    session.mkdir(mode=0o700)
    path = run / "nodes" / f"{NODE_HEX}.json"
    path.write_text(json.dumps(_record(victim.pid, str(session))))
    path.chmod(0o666)
    env = _env(str(tmp_path), str(run))
    stopped = _stop(env)
    assert stopped.returncode == 1
    assert f"skipped refusing to use node record {str(path)!r}" in stopped.stderr
    assert "mode 0666: writable by group/others" in stopped.stderr
    assert _alive(victim)
    joined = run_driver(_AUTO, env=env)
    assert "REFUSED ConnectionError" in joined.stdout, joined.stdout + joined.stderr
    assert "Node records that were not trusted, and so not used" in joined.stdout
    assert "mode 0666" in joined.stdout
    assert path.exists()                     # refused records are reported, not deleted


def test_record_naming_a_session_dir_of_another_user_is_refused(shared_tmp, tmp_path, victim):
    run = tmp_path / "run"
    (run / "nodes").mkdir(parents=True, mode=0o700)
    run.chmod(0o700)
    session = os.path.join(shared_tmp, "attacker-session")
    as_other_user(f"mkdir '{session}' && printf '%s\\n' '{ATTACKER_TOKEN}' > '{session}/token'")
    path = run / "nodes" / f"{NODE_HEX}.json"
    path.write_text(json.dumps(_record(victim.pid, session)))
    path.chmod(0o600)
    joined = run_driver(_AUTO, env=_env(str(tmp_path), str(run)))
    assert "REFUSED ConnectionError" in joined.stdout, joined.stdout + joined.stderr
    assert f"refusing to use session dir {session!r}: owned by uid {OTHER_UID}" in joined.stdout


@pytest.mark.parametrize("how", ["older process", "not a daemon"])
def test_stop_never_signals_a_process_the_record_does_not_describe(tmp_path, victim, how):
    """A record outliving its daemon names a pid that now belongs to something else."""
    if how == "older process":
        target, changes = victim, {"create_time": psutil.Process(victim.pid).create_time() - 60}
    else:
        target, changes = subprocess.Popen(["sleep", "300"]), {}
    try:
        run = tmp_path / "run"
        (run / "nodes").mkdir(parents=True, mode=0o700)
        run.chmod(0o700)
        session = tmp_path / "session"
        session.mkdir(mode=0o700)
        path = run / "nodes" / f"{NODE_HEX}.json"
        path.write_text(json.dumps(_record(target.pid, str(session), **changes)))
        path.chmod(0o600)
        stopped = _stop(_env(str(tmp_path), str(run)))
        assert stopped.returncode == 0, stopped.stderr
        reason = "different process" if how == "older process" else "not a meshray node daemon"
        assert f"removed stale record: node record {str(path)!r}: pid {target.pid}" \
               in stopped.stdout and reason in stopped.stdout
        assert target.poll() is None
        assert not path.exists()
    finally:
        if target is not victim:
            target.kill()
            target.wait()


# ------------------------------------------------------------ session files
def test_session_files_of_another_user_are_refused(shared_tmp):
    """A token or TLS settings file in a session dir someone else controls is never read."""
    from meshray._api import _read_token
    from meshray.common.private_files import UnsafePathError

    theirs = os.path.join(shared_tmp, "their-session")
    as_other_user(f"mkdir '{theirs}' && printf '%s\\n' '{ATTACKER_TOKEN}' > '{theirs}/token' "
                  f"&& printf '{{}}' > '{theirs}/tls.json'")
    with pytest.raises(UnsafePathError, match=f"owned by uid {OTHER_UID}"):
        _read_token({"session_dir": theirs})
    with pytest.raises(UnsafePathError, match=f"owned by uid {OTHER_UID}"):
        security.load_session_tls(theirs)

    # Our own session dir left writable by others: they can plant files in it.
    ours = os.path.join(shared_tmp, "our-session")
    os.mkdir(ours)
    os.chmod(ours, 0o777)
    as_other_user(f"printf '%s\\n' '{ATTACKER_TOKEN}' > '{ours}/token'")
    with pytest.raises(UnsafePathError, match="writable by group/others"):
        _read_token({"session_dir": ours})
    os.chmod(ours, 0o700)
    with pytest.raises(UnsafePathError, match=rf"{ours}/token'.*owned by uid {OTHER_UID}"):
        _read_token({"session_dir": ours})
    os.unlink(os.path.join(ours, "token"))
    security.write_token_file(os.path.join(ours, "token"), security.generate_token())
    assert stat.S_IMODE(os.stat(os.path.join(ours, "token")).st_mode) == 0o600
    assert _read_token({"session_dir": ours})
