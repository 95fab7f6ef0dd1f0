"""Runtime environments applied by real daemons: working_dir, py_modules, pip, env_vars."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest


pytestmark = pytest.mark.meshray_init(num_cpus=2)


def _make_wheel(tmp_path, name: str, version: str = "1.0") -> str:
    """Build a tiny real wheel with pip, offline."""
    project = tmp_path / f"{name}-src"
    (project / name).mkdir(parents=True)
    (project / name / "__init__.py").write_text(f"VERSION = {version!r}\n")
    (project / "pyproject.toml").write_text(textwrap.dedent(f"""
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "{name}"
        version = "{version}"
        [tool.setuptools]
        packages = ["{name}"]
    """))
    out = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(project)], check=True, timeout=120)
    return str(next(out.glob(f"{name}-*.whl")))


def test_working_dir_is_cwd_and_importable_and_honours_excludes(ray, tmp_path):
    wd = tmp_path / "project"
    (wd / "data").mkdir(parents=True)
    (wd / "helper_mod_wd.py").write_text("ANSWER = 42\n")
    (wd / "data" / "keep.txt").write_text("kept")
    (wd / "secret.log").write_text("excluded")
    (wd / ".gitignore").write_text("*.tmp\n")
    (wd / "junk.tmp").write_text("ignored")

    @ray.remote(runtime_env={"working_dir": str(wd), "excludes": ["*.log"]})
    def inspect():
        import helper_mod_wd
        return (helper_mod_wd.ANSWER, open("data/keep.txt").read(),
                os.path.exists("secret.log"), os.path.exists("junk.tmp"))

    assert ray.get(inspect.remote(), timeout=120) == (42, "kept", False, False)


def test_py_modules_ship_a_local_package(ray, tmp_path):
    package = tmp_path / "shipped_pkg_pm"
    package.mkdir()
    (package / "__init__.py").write_text("def hello():\n    return 'from py_modules'\n")

    @ray.remote(runtime_env={"py_modules": [str(package)]})
    def use():
        import shipped_pkg_pm
        return shipped_pkg_pm.hello()

    assert ray.get(use.remote(), timeout=120) == "from py_modules"


def test_pip_env_from_local_wheel_is_isolated_and_cached(ray, tmp_path):
    wheel = _make_wheel(tmp_path, "meshray_demo_pkg", "1.2")

    @ray.remote(runtime_env={"pip": [wheel]})
    def version():
        import meshray_demo_pkg
        return meshray_demo_pkg.VERSION, sys.prefix

    @ray.remote
    def plain():
        try:
            import meshray_demo_pkg  # noqa: F401
            return "visible"
        except ImportError:
            return "isolated"

    first, prefix = ray.get(version.remote(), timeout=180)
    assert first == "1.2"
    assert ray.get(plain.remote()) == "isolated"
    again, prefix_again = ray.get(version.remote(), timeout=60)
    assert (again, prefix_again) == ("1.2", prefix)


def test_failed_pip_install_raises_setup_error_with_pip_text(ray):
    @ray.remote(runtime_env={"pip": ["definitely-not-a-real-package-xyz==0.0.1"]})
    def never():
        return 1

    refs = [never.remote(), never.remote()]
    for ref in refs:   # every task that needed the env gets the error
        with pytest.raises(ray.exceptions.RuntimeEnvSetupError) as info:
            ray.get(ref, timeout=120)
        assert "definitely-not-a-real-package-xyz" in str(info.value)


def test_env_vars_merge_child_wins_and_children_inherit(ray):
    @ray.remote(runtime_env={"env_vars": {"A": "child", "B": "only-child"}})
    def child():
        return os.environ.get("A"), os.environ.get("B"), os.environ.get("C")

    @ray.remote(runtime_env={"env_vars": {"A": "parent", "C": "from-parent"}})
    def parent():
        return ray.get(child.remote())

    assert ray.get(parent.remote(), timeout=60) == ("child", "only-child", "from-parent")


def test_bad_runtime_envs_are_clear_errors(ray, tmp_path):
    with pytest.raises(ValueError, match="bogus"):
        ray.remote(runtime_env={"bogus": 1})(lambda: 1)
    with pytest.raises(ValueError, match="conda"):
        ray.remote(runtime_env={"conda": "env"})(lambda: 1)
    with pytest.raises((ValueError, FileNotFoundError), match="does-not-exist"):
        ray.remote(runtime_env={"working_dir": str(tmp_path / "does-not-exist")})(lambda: 1)


def test_actor_with_working_dir(ray, tmp_path):
    wd = tmp_path / "actor_wd"
    wd.mkdir()
    (wd / "actor_helper_mod.py").write_text("NAME = 'actor-helper'\n")

    @ray.remote(runtime_env={"working_dir": str(wd)})
    class UsesHelper:
        def name(self):
            import actor_helper_mod
            return actor_helper_mod.NAME

    actor = UsesHelper.remote()
    assert ray.get(actor.name.remote(), timeout=120) == "actor-helper"
