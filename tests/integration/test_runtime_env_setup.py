"""Real pip, real venvs: the node-side setup of runtime environments.

Uses only local wheels built here and loopback "indexes", so it needs no
network. The cache root is per test, so every test starts cold.
"""
from __future__ import annotations

import base64
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile

import psutil
import pytest

from meshray.exceptions import RuntimeEnvSetupError
from meshray.runtime_env import (
    RuntimeEnvCache, launch_spec, runtime_env_key, setup_runtime_env, upload_plan,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MISSING = "meshray-nonexistent-pkg-3f9a"


def make_wheel(directory, name="tinypkg", version="0.1", body="VALUE = 42\n") -> str:
    """A minimal valid pure-Python wheel, written by hand (no build backend needed)."""
    files = {
        f"{name}/__init__.py": body.encode(),
        f"{name}-{version}.dist-info/METADATA":
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{name}-{version}.dist-info/WHEEL":
            b"Wheel-Version: 1.0\nGenerator: meshray-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{name}-{version}.dist-info/RECORD,,")
    files[f"{name}-{version}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    path = os.path.join(str(directory), f"{name}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in files.items():
            zf.writestr(member, data)
    return path


def run_in(python: str, code: str, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    env.update(kw.pop("env", {}))
    return subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60,
                          env=env, **kw)


def no_children_left():
    return [p for p in psutil.Process().children(recursive=True) if p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture
def loopback_unproxied(monkeypatch):
    """Our fake indexes are on loopback; a CI proxy must not answer for them."""
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")


@pytest.fixture
def wheel(tmp_path):
    d = tmp_path / "wheels"
    d.mkdir()
    return make_wheel(d)


def test_pip_env_from_local_wheel_cold_then_warm(tmp_path, wheel):
    cache = RuntimeEnvCache(str(tmp_path / "cache"))
    reqs = ["--no-index", wheel]
    lines: list[str] = []
    results: list[str] = []

    def build():
        results.append(cache.ensure_pip_env(reqs, log=lines.append, timeout=120))

    t0 = time.monotonic()
    threads = [threading.Thread(target=build) for _ in range(2)]   # concurrent first use
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cold = time.monotonic() - t0
    assert len(results) == 2 and results[0] == results[1]
    python = results[0]
    assert sum("creating pip environment" in line for line in lines) == 1
    assert any("Successfully installed tinypkg-0.1" in line for line in lines)

    out = run_in(python, "import tinypkg, meshray, grpc, sys; print(tinypkg.VALUE, sys.prefix)")
    assert out.returncode == 0, out.stderr
    value, prefix = out.stdout.split()
    assert value == "42" and os.path.dirname(os.path.dirname(python)) == prefix
    # the daemon's own interpreter is untouched
    assert run_in(sys.executable, "import tinypkg").returncode != 0

    t1 = time.monotonic()
    assert cache.ensure_pip_env(list(reversed(reqs)), log=lines.append) == python  # same set
    warm = time.monotonic() - t1
    t2 = time.monotonic()
    assert RuntimeEnvCache(str(tmp_path / "cache")).ensure_pip_env(reqs) == python  # restart
    restart = time.monotonic() - t2
    print(f"\npip env cold (2 concurrent callers): {cold:.2f}s, warm: {warm * 1000:.2f}ms, "
          f"after restart: {restart * 1000:.2f}ms")
    assert warm < 0.1 and restart < 0.1


def test_env_packages_shadow_the_daemons(tmp_path):
    """An env may pin a different version of something the daemon has installed."""
    d = tmp_path / "w"
    d.mkdir()
    whl = make_wheel(d, name="cloudpickle", version="0.0.1", body="MARK = 'env'\n")
    cache = RuntimeEnvCache(str(tmp_path / "cache"))
    python = cache.ensure_pip_env({"packages": ["--no-index", whl]}, timeout=120)
    out = run_in(python, "import cloudpickle; print(cloudpickle.MARK)")
    assert out.stdout.strip() == "env", out.stderr
    assert run_in(sys.executable, "import cloudpickle; print(cloudpickle.__version__)"
                  ).stdout.strip() != "0.0.1"


def test_full_setup_runs_a_worker_like_process(tmp_path, wheel):
    wd = tmp_path / "project"
    wd.mkdir()
    (wd / "helper.py").write_text("def hello():\n    return 'from working_dir'\n")
    (wd / "data.txt").write_text("payload")
    (wd / ".gitignore").write_text("*.tmp\n")
    (wd / "junk.tmp").write_text("x")
    mod = tmp_path / "shipped_mod"
    mod.mkdir()
    (mod / "__init__.py").write_text("NAME = 'shipped'\n")
    env, packages = upload_plan({
        "working_dir": str(wd), "py_modules": [str(mod)],
        "pip": ["--no-index", wheel], "env_vars": {"MY_FLAG": "on"},
        "config": {"setup_timeout_seconds": 120}})
    store = {p.uri: p.data for p in packages}
    fetched: list[str] = []

    def fetch(uri):
        fetched.append(uri)
        return store[uri]

    cache = RuntimeEnvCache(str(tmp_path / "cache"))
    resolved = setup_runtime_env(env, cache, fetch, log=lambda line: None)
    t0 = time.monotonic()
    again = setup_runtime_env(env, cache, fetch)
    warm = time.monotonic() - t0
    print(f"\nfull setup warm: {warm * 1000:.2f}ms")
    assert warm < 0.1 and sorted(fetched) == sorted(store)     # nothing fetched twice
    assert again.env_key == resolved.env_key == runtime_env_key(env)

    spec = launch_spec(resolved, sys.executable, base_environ=os.environ)
    code = ("import os, helper, shipped_mod, tinypkg, meshray; "
            "print(helper.hello(), shipped_mod.NAME, tinypkg.VALUE, os.environ['MY_FLAG'], "
            "open('data.txt').read(), os.path.exists('junk.tmp'))")
    out = subprocess.run([spec.python, "-c", code], cwd=spec.cwd, env={**os.environ, **spec.env},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["from", "working_dir", "shipped", "42", "on", "payload", "False"]

    resolved.release(cache)
    again.release(cache)
    cache.max_bytes = 0
    assert len(cache.evict()) == 4 and cache.entries() == []


def test_unreachable_index_fails_with_pips_error(tmp_path, monkeypatch, loopback_unproxied):
    monkeypatch.setenv("PIP_RETRIES", "0")
    cache = RuntimeEnvCache(str(tmp_path / "cache"))
    lines: list[str] = []
    with pytest.raises(RuntimeEnvSetupError) as info:
        cache.ensure_pip_env(["--index-url http://127.0.0.1:9/simple", MISSING],
                             log=lines.append, timeout=120)
    msg = str(info.value)
    assert "Failed to set up runtime environment" in msg
    assert f"`pip install` of [--index-url http://127.0.0.1:9/simple {MISSING}] failed" in msg
    assert f"No matching distribution found for {MISSING}" in msg          # pip's own words
    assert any(MISSING in line for line in lines)                        # streamed as it ran
    assert os.listdir(tmp_path / "cache" / "pip") == []                  # half-made env removed
    assert cache.entries() == []


def test_setup_timeout_kills_pip_and_fails_the_same_way(tmp_path, loopback_unproxied):
    # A listening socket that never answers: pip connects, then waits for a reply.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    port = server.getsockname()[1]
    cache = RuntimeEnvCache(str(tmp_path / "cache"))
    env = {"pip": [f"--index-url http://127.0.0.1:{port}/simple", MISSING],
           "config": {"setup_timeout_seconds": 3}}
    lines: list[str] = []
    t0 = time.monotonic()
    try:
        with pytest.raises(RuntimeEnvSetupError) as info:
            setup_runtime_env(env, cache, lambda uri: b"", log=lines.append)
    finally:
        server.close()
    elapsed = time.monotonic() - t0
    msg = str(info.value)
    assert "timed out after 3s" in msg and "setup_timeout_seconds" in msg
    assert elapsed < 10
    assert os.listdir(tmp_path / "cache" / "pip") == []
    assert no_children_left() == []
