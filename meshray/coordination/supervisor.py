"""Keep a node's embedded etcd member running.

The embedded etcd is the whole cluster store of a ``meshray.init()`` or
``meshray start`` cluster; if it dies and stays dead, leases cannot be
renewed, every worker's fence lapses and existing actors stop answering.
:class:`EtcdSupervisor` restarts a member that exits on its own, on the same
data dir and ports (clients and leases carry on against the same address),
with backoff, logging every restart; a restart that keeps failing is
reported as an error in the node log, and retried.

The supervisor's thread also performs every launch: a member dies with the
thread that started it (its death signal is tied to that thread), so the
thread that starts it must live exactly as long as the supervision.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from .embedded import EmbeddedEtcd

__all__ = ["EtcdSupervisor", "restart_delay", "STABLE_AFTER_S", "ALERT_AFTER"]

log = logging.getLogger(__name__)

POLL_S = 0.1
STABLE_AFTER_S = 30.0
"""A member that stayed up this long starts its failure count afresh."""
ALERT_AFTER = 3
"""Consecutive failed restarts after which the node log gets an error."""


def restart_delay(failures: int, *, first: float = 0.1, cap: float = 10.0) -> float:
    """Seconds to wait before restart number ``failures`` (1-based) in a row.

    The first restart is nearly immediate (a crash is usually a one-off and
    every second without etcd counts against the leases); later ones back
    off exponentially so a member that cannot start does not spin.
    """
    if failures < 1:
        raise ValueError(f"failures must be >= 1, got {failures!r}")
    return min(cap, first * (4 ** (failures - 1)))


class EtcdSupervisor:
    """Start ``etcd`` and restart it whenever it exits until :meth:`stop`.

    ``on_restart(pid)`` runs on the supervisor's thread after each
    successful restart (e.g. to update the node's registry record).
    """

    def __init__(self, etcd: EmbeddedEtcd, *, start_timeout: float = 30.0,
                 restart_timeout: float = 20.0,
                 on_restart: Callable[[int], None] | None = None):
        self.etcd = etcd
        self.on_restart = on_restart
        self.restarts = 0
        self.failures = 0
        self._start_timeout = start_timeout
        self._restart_timeout = restart_timeout
        self._stop = threading.Event()
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._remove_data = True
        self._thread = threading.Thread(target=self._run, name="meshray-etcd-supervisor",
                                        daemon=True)

    def start(self) -> "EtcdSupervisor":
        """Start the member and supervise it; blocks until the first start
        succeeded and raises its error if it did not."""
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._thread.join()
            raise self._start_error
        return self

    def stop(self, timeout: float = 10.0, remove_data: bool = True) -> None:
        """Stop supervising and stop the member (see EmbeddedEtcd.stop)."""
        self._remove_data = remove_data
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():       # stuck in a restart: end it by pid
            log.warning("etcd supervisor did not stop within %.1fs; killing etcd pid %s",
                        timeout, self.etcd.pid)
            self.etcd.kill()

    # -- the supervisor thread ----------------------------------------------

    def _run(self) -> None:
        try:
            self.etcd.start(self._start_timeout)
        except BaseException as exc:  # noqa: BLE001 - handed to start()'s caller
            self._start_error = exc
            self._started.set()
            return
        self._started.set()
        try:
            self._supervise()
        finally:
            try:
                self.etcd.stop(remove_data=self._remove_data)
            except Exception:  # noqa: BLE001 - the process is ours to end whatever happens
                log.exception("stopping embedded etcd %s failed", self.etcd.endpoint)

    def _supervise(self) -> None:
        up_since: float | None = time.monotonic()     # None: not up since a failed restart
        while not self._stop.wait(POLL_S):
            if self.etcd.is_running():
                continue
            if up_since is not None and time.monotonic() - up_since >= STABLE_AFTER_S:
                self.failures = 0
            self.failures += 1
            delay = restart_delay(self.failures)
            if up_since is not None:
                log.warning("embedded etcd %s (pid %s) exited with code %s; restarting it on "
                            "the same data dir and ports in %.1fs", self.etcd.endpoint,
                            self.etcd.pid, self.etcd.returncode, delay)
            else:
                log.warning("embedded etcd %s: restart attempt %d in %.1fs",
                            self.etcd.endpoint, self.failures, delay)
            if self._stop.wait(delay):
                return
            try:
                self.etcd.start(self._restart_timeout)
            except Exception as exc:  # noqa: BLE001 - reported, then retried
                up_since = None
                if self.failures >= ALERT_AFTER:
                    log.error("embedded etcd %s failed to restart %d times in a row; the "
                              "node has no cluster store until it does (leases lapse, "
                              "actors stop answering). Still retrying. Last error: %s",
                              self.etcd.endpoint, self.failures, exc)
                else:
                    log.warning("embedded etcd %s failed to restart: %s", self.etcd.endpoint,
                                exc)
                continue
            self.restarts += 1
            up_since = time.monotonic()
            log.warning("embedded etcd %s restarted (pid %s, restart %d)", self.etcd.endpoint,
                        self.etcd.pid, self.restarts)
            if self.on_restart is not None:
                try:
                    self.on_restart(self.etcd.pid)
                except Exception:  # noqa: BLE001 - a callback never ends supervision
                    log.exception("etcd restart callback failed")
