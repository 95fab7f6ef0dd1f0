"""Lease keeping: :class:`LeaseKeeper` holds a lease alive from a daemon
thread and reports its loss exactly once (a node's membership is its lease).

It has a thread and a loss protocol of its own, so it lives apart from the
Coordinator, which keeps the one-shot lease calls (grant, revoke, refresh,
ttl) and offers :class:`LeaseKeeper` too.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Callable

from .errors import CoordinationError
from .wire import _backoff

if TYPE_CHECKING:
    from .client import Coordinator

__all__ = ["LeaseKeeper"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------
# Leases


class LeaseKeeper:
    """Hold a lease alive from a daemon thread; report its loss exactly once.

    A node's membership is its lease: when the keeper can no
    longer vouch for the lease — etcd says it is gone, or no refresh has
    succeeded for a whole TTL so it must be assumed expired — it calls
    ``on_lost(lease_id)`` once and stops. The owner then stops acting as a
    member and registers again under a new lease.

    With ``lapse_is_loss=False`` a whole TTL without a successful refresh is
    only a *lapse*: ``expires_at`` stays in the past (a fence built on it
    holds) but the keeper keeps trying, and declares the lease lost only when
    etcd answers that it is gone. A leader election or a short partition can
    outlast a TTL while etcd keeps (or revives) the lease; a node that acted
    as if it had lost it would stop work its peers never retried.
    """

    def __init__(self, coordinator: Coordinator, ttl: int,
                 on_lost: Callable[[int], None] | None = None, *,
                 lapse_is_loss: bool = True,
                 on_refreshed: Callable[[float], None] | None = None):
        """``on_refreshed(expires_at)`` runs on the keeper's thread after each
        successful refresh (a node moves its lease fence on with it)."""
        self._coord = coordinator
        self._lapse_is_loss = lapse_is_loss
        self._on_refreshed = on_refreshed
        granted_at = time.monotonic()
        self.lease_id, self.ttl = coordinator._grant(ttl, None)
        self._on_lost = on_lost
        # Conservative: the server's clock started before our request left.
        self._expires_at = granted_at + self.ttl
        self._stopped = threading.Event()
        self._lost = threading.Event()
        self._thread = threading.Thread(
            target=self._run, daemon=True,
            name=f"meshray-lease-{self.lease_id:x}")
        coordinator._keepers.add(self)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """True while the lease is believed valid and kept."""
        return not (self._lost.is_set() or self._stopped.is_set())

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    @property
    def expires_at(self) -> float:
        """CLOCK_MONOTONIC time until which the lease is certainly valid (0 once lost)."""
        return 0.0 if self._lost.is_set() else self._expires_at

    def _declare_lost(self, why: str) -> None:
        if self._lost.is_set():
            return
        self._lost.set()
        log.warning("lease %x lost: %s", self.lease_id, why)
        if self._on_lost is not None:
            try:
                self._on_lost(self.lease_id)
            except Exception:
                log.exception("lease %x: on_lost callback failed",
                              self.lease_id)

    def _run(self) -> None:
        interval = max(self.ttl / 3.0, 0.1)
        wait_s = interval
        failures = 0
        while not self._stopped.wait(wait_s):
            sent = time.monotonic()
            budget = max(0.2, min(interval, self._expires_at - sent)) \
                if sent < self._expires_at else interval   # lapsed: no deadline to beat
            try:
                ttl = self._coord.refresh_lease(self.lease_id, timeout=budget)
            except CoordinationError as exc:
                if self._stopped.is_set():
                    return
                failures += 1
                now = time.monotonic()
                if now >= self._expires_at:
                    if self._lapse_is_loss:
                        self._declare_lost(f"no successful refresh for a whole "
                                           f"TTL ({self.ttl}s); last error: {exc}")
                        return
                    wait_s = _backoff(failures, 0.1, interval)   # lapsed: keep asking
                    if failures == 1 or failures % 20 == 0:
                        log.warning("lease %x lapsed locally (no refresh for a TTL: %s); "
                                    "still trying, it may be alive in etcd", self.lease_id, exc)
                    continue
                wait_s = min(_backoff(failures, 0.1, interval),
                             max(0.0, self._expires_at - now))
                log.warning("lease %x refresh failed (%s); retrying in "
                            "%.2fs, expires in %.1fs", self.lease_id, exc,
                            wait_s, self._expires_at - now)
                continue
            if self._stopped.is_set():
                return
            if ttl <= 0:
                self._declare_lost("etcd reports it expired or revoked")
                return
            failures = 0
            self._expires_at = sent + ttl
            wait_s = min(interval, ttl / 3.0)
            if self._on_refreshed is not None:
                try:
                    self._on_refreshed(self._expires_at)
                except Exception:
                    log.exception("lease %x: on_refreshed callback failed", self.lease_id)

    def stop(self, revoke: bool = True, timeout: float | None = None) -> None:
        """Stop refreshing; with ``revoke`` also revoke the lease now so its
        keys disappear immediately instead of after the TTL."""
        self._stopped.set()
        if threading.current_thread() is not self._thread and \
                self._thread.is_alive():
            self._thread.join(timeout if timeout is not None
                              else self._coord.timeout)
        if revoke and not self._lost.is_set() and not self._coord._closed:
            try:
                self._coord.revoke_lease(self.lease_id, timeout=timeout)
            except CoordinationError as exc:
                log.warning("lease %x: revoke failed (%s); it will expire in "
                            "at most %ss", self.lease_id, exc, self.ttl)

    def __enter__(self) -> "LeaseKeeper":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
