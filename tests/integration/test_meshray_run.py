"""`meshray run` runs unmodified Ray Core scripts: `import ray` gives meshray.

Every script runs in a fresh interpreter, as a user would start it; the
pattern programs in examples/ray_patterns start their own private cluster.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import REPO

PATTERNS = os.path.join(REPO, "examples", "ray_patterns")


def _env(extra_path: str | None = None) -> dict:
    env = dict(os.environ)
    env.pop("MESHRAY_ADDRESS", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, REPO) if p)
    return env


def meshray_run(script: str, *args: str, cli: bool = False, extra_path: str | None = None,
                timeout: float = 120.0) -> subprocess.CompletedProcess:
    """`meshray run` (the CLI entry point) or `python -m meshray.run` on `script`."""
    if cli:
        command = [sys.executable, "-c", "import sys; from meshray.cli.main import main; "
                   "sys.exit(main())", "run", script, *args]
    else:
        command = [sys.executable, "-m", "meshray.run", script, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          cwd=os.path.dirname(script), env=_env(extra_path))


def write(tmp_path, name: str, code: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(code))
    return str(path)


@pytest.mark.parametrize("name, expected", [
    ("map_reduce.py", "map_reduce: the=5 dog=3 fox=3"),
    ("parameter_server.py", "parameter_server: [0.96875, 0.96875, 0.96875]"),
    ("nested_tasks.py", "nested_tasks: 528"),
    ("generator.py", "generator: [0, 1, 4, 9, 16, 25]"),
    ("pipeline.py", "pipeline: [6, 12, 18, 24, 30] {'double': 5, 'triple': 5}"),
    ("placement_group.py", "placement_group: [0, 1, 2, 3] nodes 1"),
    ("actor_pool.py", "actor_pool: 16 376 [1, 4, 7, 10]"),
    ("queue_pipeline.py", "queue_pipeline: 10 285 [0, 1, 4, 9]"),
    ("multiprocessing_pool.py", "multiprocessing_pool: 1229 [168, 135, 127] [2, 3, 4] 9"),
    ("wait_as_finished.py", "wait_as_finished: 8 280 [0, 10, 20]"),
    ("actor_stream.py", "actor_stream: 6 9198 exited 2"),
    ("progress_bars.py", "progress_bars: [20, 21, 22]"),
    ("async_service.py",
     "async_service: STREAMS ARRIVE AS THEY COME cancelled 1 3 [8, 9] 39999800000 died restarted"),
])
def test_pattern_program_prints_its_result(name, expected):
    out = meshray_run(os.path.join(PATTERNS, name), cli=True)
    assert out.returncode == 0, out.stderr
    assert expected in out.stdout.splitlines(), out.stdout
    if name == "progress_bars.py":
        # Each remote bar is drawn by the driver, once, at its final state.
        for part, total in (("part-0", 20), ("part-1", 21), ("part-2", 22)):
            drawn = [line for line in out.stdout.splitlines()
                     if f"{part}: 100%" in line and f"{total}/{total}" in line]
            assert len(drawn) == 1, out.stdout


def test_argv_name_and_exit_status_are_those_of_python(tmp_path):
    script = write(tmp_path, "argv.py", """
        import os, sys
        import ray
        print(repr(sys.argv), __name__, ray.__name__, sys.path[0] == os.path.dirname(__file__))
        print("alias variable:", os.environ.get("MESHRAY_RAY_ALIAS"))
        if __name__ == "__main__":
            sys.exit(int(sys.argv[1]))
    """)
    out = meshray_run(script, "3", "--flag", "x y")
    assert out.returncode == 3, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"{[script, '3', '--flag', 'x y']!r} __main__ meshray True"
    # Nothing leaks into the environment that programs the script starts inherit.
    assert lines[1] == "alias variable: None"


def test_uncaught_exception_is_reported_from_the_script(tmp_path):
    script = write(tmp_path, "boom.py", """
        def fail():
            raise ValueError("boom from the script")
        fail()
    """)
    out = meshray_run(script, cli=True)
    assert out.returncode == 1
    assert out.stderr.startswith("Traceback (most recent call last):\n"
                                 f'  File "{script}", line 4, in <module>'), out.stderr
    assert out.stderr.rstrip().endswith("ValueError: boom from the script")
    assert "meshray/run.py" not in out.stderr


@pytest.mark.parametrize("statement, module, library", [
    ("import ray.data", "ray.data", "Ray Data"),
    ("from ray import tune", "ray.tune", "Ray Tune"),
    ("from ray.serve import deployment", "ray.serve", "Ray Serve"),
])
def test_ray_libraries_meshray_lacks_are_refused_by_name(tmp_path, statement, module, library):
    script = write(tmp_path, "lib.py", f"""
        import ray
        {statement}
    """)
    out = meshray_run(script)
    assert out.returncode == 1
    assert (f"ModuleNotFoundError: No module named {module!r}: meshray does not provide "
            f"{library}") in out.stderr, out.stderr


def test_task_importing_ray_in_the_worker_gets_meshray_even_with_a_ray_installed(tmp_path):
    # A package named `ray` on the path of the driver and of every worker.
    fake = tmp_path / "site" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('the installed ray was imported')\n")
    script = write(tmp_path, "worker_import.py", """
        import ray

        @ray.remote
        def inside():
            import ray
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
            from ray.exceptions import RayTaskError
            return ray.__name__, NodeAffinitySchedulingStrategy.__module__, RayTaskError.__module__

        @ray.remote
        class Holder:
            def modules(self):
                import ray.util
                return ray.util.__name__

        ray.init(num_cpus=1)
        print(ray.get(inside.remote()))
        print(ray.get(Holder.remote().modules.remote()))
        ray.shutdown()
    """)
    out = meshray_run(script, extra_path=str(tmp_path / "site"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "('meshray', 'meshray.scheduler.strategies', 'meshray.exceptions')",
        "meshray.util",
    ]


def test_the_runtime_env_a_script_sees_is_its_own(tmp_path):
    """`meshray run` tells the job's workers to alias `ray` without that
    showing in the runtime env the program reads."""
    script = write(tmp_path, "env.py", """
        import json
        import ray

        @ray.remote
        def env():
            return ray.get_runtime_context().runtime_env

        ray.init(num_cpus=1, runtime_env={"env_vars": {"A": "1"}})
        print(json.dumps(ray.get(env.remote()), sort_keys=True))
        print(json.dumps(ray.get_runtime_context().runtime_env, sort_keys=True))
        ray.shutdown()
        ray.init(num_cpus=1)
        print(json.dumps(ray.get(env.remote()), sort_keys=True))
        ray.shutdown()
    """)
    out = meshray_run(script)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ['{"env_vars": {"A": "1"}}'] * 2 + ["{}"]


def test_script_that_is_not_a_file_is_refused(tmp_path):
    out = meshray_run(str(tmp_path / "missing.py"))
    assert out.returncode == 2
    assert "missing.py" in out.stderr and "is not a file" in out.stderr


def test_attribute_access_to_a_library_meshray_lacks_names_it(tmp_path):
    # Ray loads ray.data on first attribute access, with no import of its own.
    script = write(tmp_path, "attr.py", """
        import ray
        print(hasattr(ray, "data"), hasattr(ray, "train"))
        ray.data.range(3)
    """)
    out = meshray_run(script)
    assert out.returncode == 1
    assert out.stdout.splitlines() == ["False False"]
    assert ("MissingRayLibraryError: module 'meshray' has no attribute 'data': meshray does "
            "not provide Ray Data (ray.data)") in out.stderr, out.stderr
