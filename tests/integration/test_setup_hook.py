"""runtime_env={"worker_process_setup_hook": ...}: a callable, or the dotted
name of an importable function, run once in each worker process of that env
before its first task; a hook that fails fails the work with its error."""
from __future__ import annotations

import os
import threading

import pytest

CALL_TIMEOUT_S = 60


def test_callable_hook_runs_once_per_worker_before_its_tasks(ray, tmp_path):
    log = str(tmp_path / "hook.log")

    def hook():
        os.environ["MESHRAY_TEST_HOOKED"] = "yes"
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")

    @ray.remote(runtime_env={"worker_process_setup_hook": hook})
    def probe():
        return os.getpid(), os.environ.get("MESHRAY_TEST_HOOKED")

    results = ray.get([probe.remote() for _ in range(8)], timeout=CALL_TIMEOUT_S)
    assert all(hooked == "yes" for _pid, hooked in results)
    ran = open(log).read().split()
    assert sorted(set(ran)) == sorted(ran)                       # once per process
    assert {str(pid) for pid, _hooked in results} <= set(ran)    # in every one that ran a task

    @ray.remote(runtime_env={"worker_process_setup_hook": hook})
    class Hooked:
        def hooked(self):
            return os.environ.get("MESHRAY_TEST_HOOKED")

    assert ray.get(Hooked.remote().hooked.remote(), timeout=CALL_TIMEOUT_S) == "yes"


def test_module_function_name_is_imported_and_run(ray, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "hook_module_for_test.py").write_text(
        "import os\n\ndef setup():\n    os.environ['MESHRAY_TEST_NAMED_HOOK'] = 'ran'\n")

    @ray.remote(runtime_env={"working_dir": str(project),
                             "worker_process_setup_hook": "hook_module_for_test.setup"})
    def probe():
        return os.environ.get("MESHRAY_TEST_NAMED_HOOK")

    assert ray.get(probe.remote(), timeout=CALL_TIMEOUT_S) == "ran"


def test_failing_hook_fails_tasks_and_actor_creation_with_its_error(ray):
    def broken_hook():
        raise ValueError("setup hook is broken on purpose")

    env = {"worker_process_setup_hook": broken_hook}

    @ray.remote(runtime_env=env)
    def task():
        return "ran"

    with pytest.raises(ray.exceptions.RuntimeEnvSetupError) as info:
        ray.get(task.remote(), timeout=CALL_TIMEOUT_S)
    assert "setup hook is broken on purpose" in str(info.value)
    assert "Failed to execute the setup hook" in str(info.value)

    @ray.remote(runtime_env=env)
    class Actor:
        def ping(self):
            return 1

    with pytest.raises(ray.exceptions.ActorDiedError) as died:
        ray.get(Actor.remote().ping.remote(), timeout=CALL_TIMEOUT_S)
    assert "setup hook is broken on purpose" in str(died.value)

    missing = {"worker_process_setup_hook": "no_such_module_here.setup"}
    with pytest.raises(ray.exceptions.RuntimeEnvSetupError, match="no_such_module_here"):
        ray.get(task.options(runtime_env=missing).remote(), timeout=CALL_TIMEOUT_S)


def test_bad_hooks_are_refused_where_declared(ray):
    lock = threading.Lock()

    def task():
        return 1

    with pytest.raises(ray.exceptions.RuntimeEnvSetupError, match="cannot be pickled"):
        ray.remote(runtime_env={"worker_process_setup_hook": lambda: print(lock)})(task)
    with pytest.raises(TypeError, match="worker_process_setup_hook"):
        ray.remote(runtime_env={"worker_process_setup_hook": 42})(task)
    with pytest.raises(ValueError, match="dotted name"):
        ray.remote(runtime_env={"worker_process_setup_hook": "not a name"})(task)


JOB_LEVEL_DRIVER = """
import os

import meshray


def hook():
    os.environ["MESHRAY_TEST_JOB_HOOK"] = f"ran in {os.getpid()}"


meshray.init(num_cpus=2, runtime_env={"worker_process_setup_hook": hook})


@meshray.remote
def probe():
    return os.getpid(), os.environ.get("MESHRAY_TEST_JOB_HOOK"), os.environ.get("EXTRA")


@meshray.remote
class Probe:
    def probe(self):
        return os.getpid(), os.environ.get("MESHRAY_TEST_JOB_HOOK"), os.environ.get("EXTRA")


answers = meshray.get([probe.remote() for _ in range(4)], timeout=120)
answers.append(meshray.get(Probe.remote().probe.remote(), timeout=120))
# A task's own runtime_env is merged over the job's: the hook still applies.
answers.append(meshray.get(
    probe.options(runtime_env={"env_vars": {"EXTRA": "1"}}).remote(), timeout=120))
for pid, hooked, _extra in answers:
    assert hooked == f"ran in {pid}", (pid, hooked)
assert answers[-1][2] == "1"
print("hooked", len(answers))
meshray.shutdown()
"""


def test_job_level_hook_from_init_runs_in_the_jobs_task_and_actor_workers():
    from tests.helpers import run_driver
    env = {k: v for k, v in os.environ.items() if k not in ("MESHRAY_ADDRESS", "RAY_ADDRESS")}
    out = run_driver(JOB_LEVEL_DRIVER, timeout=180, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["hooked 6"]
