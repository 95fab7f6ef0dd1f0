"""Worker log files and the log API on real nodes: written, streamed, rotated,
kept after the worker exits, and read from a node that does not hold them."""
from __future__ import annotations

import os
import queue
import sys
import threading

import cloudpickle
import pytest

from tests.helpers import process_gone, run_driver, wait_for

# Workers do not have this test module on their path: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _session_dir(node) -> str:
    return node._process.session_dir


def _text(**kwargs) -> str:
    from meshray.util.state.logs import get_log
    return "".join(get_log(**kwargs))


def test_task_output_lands_in_its_worker_files_and_the_driver_sees_it_prefixed():
    code = """
import os, sys, meshray
from meshray.core.state import state
from meshray.util.state.logs import get_log, list_logs
from tests.helpers import wait_for
meshray.init(num_cpus=1)

@meshray.remote
def chatty():
    print("to stdout from chatty")
    print("to stderr from chatty", file=sys.stderr)
    return os.getpid()

pid = meshray.get(chatty.remote())
wait_for(lambda: "to stdout from chatty" in "".join(get_log(pid=pid)))
wait_for(lambda: "to stderr from chatty" in "".join(get_log(pid=pid, suffix="err")))
logs = os.path.join(state.local_node.session_dir, "logs")
names = [n for n in os.listdir(logs) if n.endswith(f"-{pid}.out")]
mode = oct(os.stat(logs).st_mode & 0o777), oct(os.stat(os.path.join(logs, names[0])).st_mode & 0o777)
print("FILES", names, list_logs()["worker_out"], mode, flush=True)
meshray.shutdown()
"""
    result = run_driver(code, timeout=120)
    assert result.returncode == 0, result.stderr
    pid = result.stdout.split("FILES")[0].split("pid=")[1].split(")")[0]
    assert f"(chatty pid={pid}) to stdout from chatty" in result.stdout
    assert f"(chatty pid={pid}) to stderr from chatty" in result.stderr
    files_line = result.stdout.split("FILES", 1)[1]
    assert f"-ffffffff-{pid}.out" in files_line and "('0o700', '0o600')" in files_line


@pytest.mark.cluster_args(initialize_head=True, head_node_args={"num_cpus": 1})
def test_get_log_by_task_and_actor_from_a_node_that_does_not_hold_them(cluster, capfd):
    far = cluster.add_node(num_cpus=1, resources={"far": 1})
    ray = cluster.connect()

    @ray.remote(resources={"far": 0.5})
    def remote_print():
        print("task line on the far node", flush=True)
        return ray.get_runtime_context().get_task_id(), os.getpid()

    @ray.remote(resources={"far": 0.5})
    class Speaker:
        def say(self, text):
            print(text, flush=True)
            return os.getpid()

    task_id, task_pid = ray.get(remote_print.remote(), timeout=60)
    speaker = Speaker.remote()
    actor_pid = ray.get(speaker.say.remote("actor line on the far node"), timeout=60)
    # The driver (on the head node) still sees both lines, named as Ray names them.
    seen = []

    def printed(text: str) -> bool:
        seen.append(capfd.readouterr().out)
        return text in "".join(seen)

    wait_for(lambda: printed("actor line on the far node") and printed("task line"),
             message="both lines reached the driver")
    assert f"(remote_print pid={task_pid}, ip=127.0.0.1) task line on the far node" \
        in "".join(seen)
    assert f"(Speaker pid={actor_pid}, ip=127.0.0.1) actor line on the far node" \
        in "".join(seen)

    # The driver's node (the head) holds neither file: it finds the node that does.
    wait_for(lambda: "task line on the far node" in _text(task_id=task_id))

    def actor_text() -> str:
        # Where the actor lives comes from its record in etcd, which its host
        # publishes a moment after the actor starts answering calls: until
        # then the lookup says so, and the test waits for the record.
        try:
            return _text(actor_id=speaker._actor_id.hex())
        except ValueError as exc:
            if "the actor has no worker yet" not in str(exc):
                raise
            return ""

    wait_for(lambda: "actor line on the far node" in actor_text())
    from meshray.util.state.logs import list_logs
    far_files = list_logs(node_id=far.node_id)["worker_out"]
    assert any(name.endswith(f"-{task_pid}.out") for name in far_files)
    head_files = list_logs().get("worker_out", [])
    assert not any(name.endswith(f"-{task_pid}.out") for name in head_files)

    # The files stay after the worker exits.
    ray.kill(speaker)
    wait_for(lambda: process_gone(actor_pid), message="the actor's worker exited")
    assert "actor line on the far node" in _text(node_id=far.node_id, pid=actor_pid)


@pytest.mark.cluster_args(initialize_head=True, head_node_args={"num_cpus": 1})
def test_follow_yields_lines_as_they_are_written(cluster):
    far = cluster.add_node(num_cpus=1, resources={"far": 1})
    ray = cluster.connect()

    @ray.remote(resources={"far": 1})
    class Speaker:
        def say(self, text):
            print(text, flush=True)
            return os.getpid()

    speaker = Speaker.remote()
    pid = ray.get(speaker.say.remote("first line"), timeout=60)
    from meshray.util.state.logs import get_log
    lines: queue.Queue = queue.Queue()
    stop = threading.Event()

    def follow():
        for line in get_log(node_id=far.node_id, pid=pid, follow=True, _interval=0.1):
            lines.put(line)
            if stop.is_set():
                return

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()

    def expect(text: str) -> None:
        while True:
            line = lines.get(timeout=30)   # fails the test when nothing comes
            if line == text + "\n":
                return

    expect("first line")
    ray.get(speaker.say.remote("written later"), timeout=60)
    expect("written later")
    stop.set()
    ray.get(speaker.say.remote("unblocks the follower"), timeout=60)
    follower.join(timeout=30)
    assert not follower.is_alive()


@pytest.mark.cluster_args(initialize_head=True, head_node_args={"num_cpus": 1})
def test_rotation_at_a_small_cap_keeps_at_most_the_backups_asked_for(cluster):
    env = {**os.environ, "MESHRAY_LOG_ROTATION_MAX_BYTES": "2000",
           "RAY_ROTATION_BACKUP_COUNT": "2"}
    far = cluster.add_node(num_cpus=1, resources={"far": 1}, env=env)
    ray = cluster.connect()

    @ray.remote(resources={"far": 1})
    def loud():
        for index in range(400):
            print(f"line {index:05d} " + "x" * 40)
        return os.getpid()

    pid = ray.get(loud.remote(), timeout=60)
    logs = os.path.join(_session_dir(far), "logs")

    def files():
        return sorted(n for n in os.listdir(logs) if f"-{pid}.out" in n)

    wait_for(lambda: any("line 00399" in line for line in _lines(far, pid)),
             message="the last line was written")
    names = files()
    assert [n.rsplit(".out", 1)[1] for n in names] == ["", ".1", ".2"]
    assert all(os.path.getsize(os.path.join(logs, n)) <= 2000 for n in names)
    from meshray.util.state.logs import list_logs
    listed = list_logs(node_id=far.node_id, glob_filter=f"*-{pid}.out*")["worker_out"]
    assert sorted(listed) == names


def _lines(node, pid):
    return _text(node_id=node.node_id, pid=pid).splitlines()


@pytest.mark.cluster_args(initialize_head=True, head_node_args={"num_cpus": 1})
def test_a_path_outside_the_logs_dir_is_refused_with_value_error(cluster):
    far = cluster.add_node(num_cpus=1)
    ray = cluster.connect()
    from meshray import exceptions
    from meshray.core.state import state
    from meshray.util.state.logs import get_log
    outside = os.path.join(_session_dir(far), "outside.txt")
    with open(outside, "w") as handle:
        handle.write("not a log")
    os.symlink(outside, os.path.join(_session_dir(far), "logs", "planted.out"))
    for name in ("../outside.txt", "..", "logs/../../etc/passwd", "/etc/passwd"):
        with pytest.raises(ValueError, match="filename="):
            list(get_log(node_id=far.node_id, filename=name))
        # The node refuses it too, when asked directly (not through the API's checks).
        with pytest.raises(exceptions.RaySystemError, match="ValueError: filename="):
            state.core.request("get_log", {"node_id": far.node_id, "filename": name})
    with pytest.raises(ValueError, match="planted.out"):
        list(get_log(node_id=far.node_id, filename="planted.out"))
    del ray


# The worker's line reaches files, not this driver's stdout: printed here
# too, from the log-printing thread, it could land inside the TASK line.
CLI_DRIVER = """
import os, meshray
meshray.init(address="auto", log_to_driver=False)

@meshray.remote
def shout():
    print("line for the cli")
    return meshray.get_runtime_context().get_task_id(), os.getpid()

task_id, pid = meshray.get(shout.remote())
print("TASK", task_id, pid)
"""


def test_cli_lists_prints_and_refuses(tmp_path):
    import subprocess

    from meshray import security
    from tests.helpers import REPO
    env = {k: v for k, v in os.environ.items()
           if k not in (security.TOKEN_ENV, security.TOKEN_FILE_ENV)}
    env["MESHRAY_RUN_DIR"] = str(tmp_path / "run")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    cli = [sys.executable, "-m", "meshray.cli.main"]

    def run(*args, **kwargs):
        return subprocess.run(list(args), capture_output=True, text=True, env=env,
                              timeout=90, cwd=REPO, **kwargs)

    started = run(*cli, "start", "--num-cpus", "1")
    try:
        assert started.returncode == 0, started.stderr
        driver = run(sys.executable, "-c", CLI_DRIVER)
        assert driver.returncode == 0, driver.stderr
        _, task_id, pid = next(line.split() for line in driver.stdout.splitlines()
                               if line.startswith("TASK"))
        listing = run(*cli, "logs")
        assert listing.returncode == 0, listing.stderr
        assert "worker_out:" in listing.stdout and f"-{pid}.out" in listing.stdout
        by_pid = run(*cli, "logs", "worker", "--pid", pid)
        assert by_pid.returncode == 0 and "line for the cli" in by_pid.stdout, by_pid.stderr
        by_task = run(*cli, "logs", "task", "--id", task_id, "--tail", "1")
        assert by_task.stdout == "line for the cli\n", by_task.stderr
        one_file = run(*cli, "logs", f"*-{pid}.out")      # one match: printed
        assert "line for the cli" in one_file.stdout, one_file.stderr
        missing_id = run(*cli, "logs", "actor")
        assert missing_id.returncode == 2 and "needs --id" in missing_id.stderr
        hostile = run(*cli, "logs", "worker", "--pid", "1", "--node-id", "zz")
        assert hostile.returncode == 2 and "node_id='zz'" in hostile.stderr
    finally:
        run(*cli, "stop")


@pytest.mark.cluster_args(initialize_head=True, head_node_args={"num_cpus": 1})
def test_runtime_env_setup_output_is_kept_in_a_per_job_file(cluster, tmp_path):
    (tmp_path / "data.txt").write_text("packaged")
    ray = cluster.connect()

    @ray.remote(runtime_env={"working_dir": str(tmp_path)})
    def read_packaged():
        with open("data.txt") as handle:
            return handle.read()

    assert ray.get(read_packaged.remote(), timeout=120) == "packaged"
    name = f"runtime_env_setup-{ray.get_runtime_context().get_job_id()}.log"
    from meshray.util.state.logs import list_logs
    wait_for(lambda: name in list_logs().get("runtime_env", []),
             message="the setup log is listed")
    assert "runtime_env: fetching" in _text(filename=name)
