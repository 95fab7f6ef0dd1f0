"""`pip install meshray` brings the chaos harness: the wheel holds `chaos/`, and
`meshray chaos` runs from an unpacked wheel outside the checkout."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from ..helpers import REPO


@pytest.fixture(scope="module")
def unpacked_wheel(tmp_path_factory):
    """A wheel built from a copy of the checkout (the build must not write
    into it), unpacked into a directory of its own."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "tests", "examples"))
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(base / "dist"), str(source)],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    (wheel,) = (base / "dist").glob("meshray-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(base / "site")
    return base / "site", names


def test_the_wheel_contains_the_chaos_package(unpacked_wheel):
    _, names = unpacked_wheel
    for module in ("__init__", "__main__", "cli", "cluster", "nemeses", "workloads",
                   "checkers", "history", "proxy", "fuzz_wire"):
        assert f"chaos/{module}.py" in names
    assert "meshray/cli/main.py" in names
    assert not any(name.startswith("tests/") for name in names)


def test_meshray_chaos_list_runs_from_the_installed_files(unpacked_wheel, tmp_path):
    site, _ = unpacked_wheel
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = ("import sys, chaos, meshray.cli.main as m; "
             "print(chaos.__file__); print(m.__file__); sys.argv[0] = 'meshray'; "
             "sys.exit(m.main(['chaos', 'list']))")
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=str(tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    chaos_file, cli_file, *listing = out.stdout.splitlines()
    assert chaos_file.startswith(str(site)) and cli_file.startswith(str(site))
    text = "\n".join(listing)
    assert "nemeses:" in text and "kill-node" in text and "checkers" in text
