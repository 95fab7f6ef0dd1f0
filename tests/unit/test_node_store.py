"""The store-dir sweep at daemon start (node/node_store.py)."""
from __future__ import annotations

import os

from meshray.node import node_store


def test_the_sweep_runs_once_per_process_not_once_per_node(tmp_path, monkeypatch):
    swept = []
    monkeypatch.setattr(node_store, "SHM_ROOT", str(tmp_path))
    monkeypatch.setattr(node_store, "_swept_roots", set())
    monkeypatch.setattr(node_store, "sweep_stale_stores", swept.append)
    stores = [node_store.open_node_store(bytes([i]) * 16, str(tmp_path / f"s{i}"), 1 << 20)
              for i in range(3)]
    try:
        assert swept == [str(tmp_path)]
        for store in stores:
            with open(os.path.join(store.shm_dir, node_store.OWNER_FILE)) as handle:
                assert handle.read() == str(os.getpid())
    finally:
        for store in stores:
            store.destroy()


def test_each_owner_pid_is_looked_up_once_per_sweep(tmp_path, monkeypatch):
    import psutil
    looked_up = []
    real_process = psutil.Process

    def counting_process(pid):
        looked_up.append(pid)
        return real_process(pid)

    monkeypatch.setattr(psutil, "Process", counting_process)
    for i in range(4):                      # four live stores of this process
        live = tmp_path / f"meshray-live{i}"
        live.mkdir()
        (live / node_store.OWNER_FILE).write_text(str(os.getpid()))
    dead = tmp_path / "meshray-dead"
    dead.mkdir()
    (dead / node_store.OWNER_FILE).write_text("999999999")
    monkeypatch.setattr(node_store, "DAEMON_MODULES", ("pytest", "py.test"))
    node_store.sweep_stale_stores(str(tmp_path))
    assert sorted(looked_up) == sorted([os.getpid(), 999999999])
    assert not dead.exists()
    assert all((tmp_path / f"meshray-live{i}").exists() for i in range(4))
