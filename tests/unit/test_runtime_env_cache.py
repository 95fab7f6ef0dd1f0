"""Node-side cache (packages only, no pip), eviction policy, env keys and launch specs."""
from __future__ import annotations

import os
import threading
import time

import pytest

from meshray.exceptions import RuntimeEnvSetupError
from meshray.runtime_env import (
    DEFAULT_ENV_KEY, CacheEntryInfo, ResolvedRuntimeEnv, RuntimeEnvCache, choose_evictions,
    launch_spec, package_directory, runtime_env_key, setup_runtime_env, upload_plan,
)


def E(key, size, last_used, refs=0):
    return CacheEntryInfo(key, size, last_used, refs)


# ---- eviction policy (pure) ------------------------------------------------------------

def test_nothing_evicted_under_the_limit():
    assert choose_evictions([E("a", 5, 1), E("b", 5, 2)], 10) == []
    assert choose_evictions([], 0) == []


def test_least_recently_used_first_until_it_fits():
    entries = [E("new", 4, 30), E("old", 4, 10), E("mid", 4, 20)]
    assert choose_evictions(entries, 8) == ["old"]
    assert choose_evictions(entries, 4) == ["old", "mid"]
    assert choose_evictions(entries, 0) == ["old", "mid", "new"]


def test_entries_in_use_are_never_evicted():
    entries = [E("old-busy", 100, 1, refs=2), E("new", 10, 5)]
    assert choose_evictions(entries, 50) == ["new"]        # still over: nothing else may go
    assert choose_evictions([E("busy", 100, 1, refs=1)], 0) == []


def test_ties_break_by_key_for_determinism():
    assert choose_evictions([E("b", 1, 1), E("a", 1, 1)], 1) == ["a"]


# ---- packages in the cache ---------------------------------------------------------------

@pytest.fixture
def pkg(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "m.py").write_text("V = 1\n")
    return package_directory(tmp_path / "src")


def test_unpacked_once_then_served_from_disk(tmp_path, pkg):
    cache = RuntimeEnvCache(str(tmp_path / "c"), max_bytes=10 ** 9)
    calls = []

    def fetch():
        calls.append(1)
        return pkg.data

    path = cache.ensure_package(pkg.uri, fetch)
    assert open(os.path.join(path, "m.py")).read() == "V = 1\n"
    assert cache.ensure_package(pkg.uri, fetch) == path
    assert RuntimeEnvCache(str(tmp_path / "c")).ensure_package(pkg.uri, fetch) == path  # restart
    assert len(calls) == 1
    assert [e.key for e in cache.entries()] == [cache.key_for_uri(pkg.uri)]
    assert not os.listdir(tmp_path / "c" / "tmp")


def test_concurrent_setups_fetch_once(tmp_path, pkg):
    cache = RuntimeEnvCache(str(tmp_path / "c"))
    calls, paths = [], []

    def fetch():
        calls.append(1)
        time.sleep(0.05)
        return pkg.data

    threads = [threading.Thread(target=lambda: paths.append(cache.ensure_package(pkg.uri, fetch)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(paths)) == 1 and len(paths) == 8


def test_two_caches_on_one_root_race_safely(tmp_path, pkg):
    a, b = RuntimeEnvCache(str(tmp_path / "c")), RuntimeEnvCache(str(tmp_path / "c"))
    barrier = threading.Barrier(2)

    def slow_fetch():
        barrier.wait()
        return pkg.data

    out = []
    ts = [threading.Thread(target=lambda c=c: out.append(c.ensure_package(pkg.uri, slow_fetch)))
          for c in (a, b)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(out) == 2 and out[0] == out[1] and os.path.isdir(out[0])
    assert not os.listdir(tmp_path / "c" / "tmp")          # the loser's copy is gone


def test_bad_bytes_and_failed_fetch_are_setup_errors(tmp_path, pkg):
    cache = RuntimeEnvCache(str(tmp_path / "c"))
    with pytest.raises(RuntimeEnvSetupError, match="not a valid package zip"):
        cache.ensure_package(pkg.uri, lambda: b"garbage")

    def boom():
        raise ConnectionError("peer went away")
    with pytest.raises(RuntimeEnvSetupError, match="fetching .* failed: ConnectionError: peer"):
        cache.ensure_package(pkg.uri, boom)
    assert cache.entries() == [] and not os.listdir(tmp_path / "c" / "tmp")


def test_refcounts_protect_entries_from_eviction(tmp_path, pkg):
    cache = RuntimeEnvCache(str(tmp_path / "c"), max_bytes=0)
    key = cache.key_for_uri(pkg.uri)
    path = cache.ensure_package(pkg.uri, lambda: pkg.data, acquire=True)
    cache.acquire(key)
    assert cache.evict() == [] and os.path.isdir(path)
    cache.release(key)
    assert cache.evict() == [] and os.path.isdir(path)
    cache.release(key)
    assert cache.evict() == [key] and not os.path.exists(path)
    with pytest.raises(ValueError, match="released more often"):
        cache.release(key)
    with pytest.raises(KeyError, match="no ready entry"):
        cache.acquire(key)


def test_another_daemons_pin_blocks_eviction(tmp_path, pkg):
    mine = RuntimeEnvCache(str(tmp_path / "c"))
    theirs = RuntimeEnvCache(str(tmp_path / "c"), max_bytes=0)
    path = mine.ensure_package(pkg.uri, lambda: pkg.data, acquire=True)
    assert theirs.evict() == [] and os.path.isdir(path)
    mine.release(mine.key_for_uri(pkg.uri))
    assert theirs.evict() == [mine.key_for_uri(pkg.uri)]


def test_lru_eviction_keeps_the_recent_entry(tmp_path):
    pkgs = []
    for i in range(3):
        d = tmp_path / f"s{i}"
        d.mkdir()
        (d / "f.bin").write_bytes(bytes([i]) * 1000)
        pkgs.append(package_directory(d))
    cache = RuntimeEnvCache(str(tmp_path / "c"), max_bytes=10 ** 9)
    for p in pkgs:
        cache.ensure_package(p.uri, lambda p=p: p.data)
        time.sleep(0.01)
    cache.ensure_package(pkgs[0].uri, lambda: b"")          # a hit refreshes its last use
    cache.max_bytes = 1500
    assert cache.evict() == [cache.key_for_uri(pkgs[1].uri), cache.key_for_uri(pkgs[2].uri)]


# ---- setup without pip + launch specs ---------------------------------------------------------

def test_setup_and_launch_for_files_only(tmp_path):
    (tmp_path / "wd").mkdir()
    (tmp_path / "wd" / "main.py").write_text("")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "__init__.py").write_text("")
    env, pkgs = upload_plan({"working_dir": str(tmp_path / "wd"), "py_modules": [str(tmp_path / "m")],
                             "env_vars": {"GREETING": "hi ${USER_X}", "PYTHONPATH": "/extra"}})
    store = {p.uri: p.data for p in pkgs}
    cache = RuntimeEnvCache(str(tmp_path / "c"))
    lines = []
    resolved = setup_runtime_env(env, cache, store.__getitem__, log=lines.append)
    assert any("fetching" in line for line in lines)
    assert resolved.env_key == runtime_env_key(env) != DEFAULT_ENV_KEY
    assert all(e.refs == 1 for e in cache.entries())
    spec = launch_spec(resolved, "/usr/bin/python3", base_environ={"USER_X": "bob", "PATH": "/bin"})
    assert spec.python == "/usr/bin/python3" and spec.cwd == resolved.working_dir
    assert spec.env["GREETING"] == "hi bob"
    assert spec.env["PYTHONPATH"].split(os.pathsep) == [resolved.working_dir,
                                                        resolved.py_module_paths[0], "/extra"]
    assert "PATH" not in spec.env and "VIRTUAL_ENV" not in spec.env
    resolved.release(cache)
    assert all(e.refs == 0 for e in cache.entries())


def test_setup_failure_releases_what_it_pinned(tmp_path, pkg):
    cache = RuntimeEnvCache(str(tmp_path / "c"))
    missing = "meshray-pkg://" + "1" * 64 + ".zip"
    env = {"working_dir": pkg.uri, "py_modules": [missing]}
    with pytest.raises(RuntimeEnvSetupError, match="KeyError"):
        setup_runtime_env(env, cache, {pkg.uri: pkg.data}.__getitem__)
    assert [e.refs for e in cache.entries()] == [0]


def test_setup_rejects_unshipped_local_paths(tmp_path):
    with pytest.raises(RuntimeEnvSetupError, match="upload_plan"):
        setup_runtime_env({"working_dir": str(tmp_path)}, RuntimeEnvCache(str(tmp_path / "c")),
                          lambda uri: b"")


def test_launch_spec_is_pure_and_keyed():
    r = ResolvedRuntimeEnv(env_key="k1", python="/envs/e/bin/python", env_vars={"A": "${A}x"})
    s1 = launch_spec(r, "/py", base_environ={"A": "1", "PATH": "/bin", "PYTHONPATH": "/repo"})
    assert s1 == launch_spec(r, "/py", base_environ={"A": "1", "PATH": "/bin", "PYTHONPATH": "/repo"})
    assert s1.python == "/envs/e/bin/python" and s1.env_key == "k1"
    assert s1.env == {"A": "1x", "VIRTUAL_ENV": "/envs/e", "PATH": "/envs/e/bin:/bin"}
    assert s1.argv() == ["/envs/e/bin/python", "-m", "meshray.core.worker_main"]
    assert launch_spec(r, "/py").env["A"] == "${A}x"          # no environ: nothing expanded
    assert launch_spec(None, "/py").env_key == DEFAULT_ENV_KEY
    wd = ResolvedRuntimeEnv(env_key="k2", working_dir="/c/wd")
    assert launch_spec(wd, "/py", base_environ={"PYTHONPATH": "/repo"}).env == {
        "PYTHONPATH": "/c/wd:/repo"}


def test_runtime_env_key_ignores_config_and_pip_order():
    a = {"pip": {"packages": ["a", "b"], "pip_check": False}, "config": {"eager_install": True}}
    b = {"pip": {"packages": ["b", "a"], "pip_check": False}}
    assert runtime_env_key(a) == runtime_env_key(b)
    assert runtime_env_key(None) == runtime_env_key({}) == runtime_env_key({"config": {}}) == "default"
    assert runtime_env_key({"env_vars": {"A": "1"}}) != runtime_env_key({"env_vars": {"A": "2"}})
