"""Health endpoints on the node's HTTP port, for kubelet probes and load balancers.

Three GET routes, with the paths Ray's dashboard uses:

- ``/api/local_raylet_healthz`` -- *liveness*: the daemon's event loop runs
  a no-op within LOOP_TIMEOUT_S. It does not look at etcd, so an etcd outage
  (when every node would fail at once) restarts no pod.
- ``/api/gcs_healthz`` -- the coordination store: this node holds a live
  etcd lease and its record is published.
- ``/api/healthz`` -- *readiness*: the loop answers, the node is a
  registered member with a live lease, and it is not draining (a draining
  node leaves its Services so no new client reaches it).

They are public routes -- a kubelet cannot send the cluster token -- so
they answer nothing but ``{"status": "success"}`` (200) or
``{"status": "failed", "reason": ...}`` (503) with a short fixed reason:
no ids, addresses, counts or versions (docs/security.md).
"""
from __future__ import annotations

from meshray.node.http_api import HttpError, Route

__all__ = ["LOOP_TIMEOUT_S", "health_routes", "readiness"]

LOOP_TIMEOUT_S = 5.0


def readiness(*, loop_ok: bool, registered: bool, lease_valid: bool,
              draining: bool) -> tuple[bool, str]:
    """(ready, short reason) from what the node knows of itself."""
    if not loop_ok:
        return False, "event loop not answering"
    if not registered:
        return False, "not registered in etcd"
    if not lease_valid:
        return False, "etcd lease not confirmed"
    if draining:
        return False, "draining"
    return True, ""


def _answer(ok: bool, reason: str) -> tuple:
    if ok:
        return 200, {"status": "success"}
    return 503, {"status": "failed", "reason": reason}


class _Health:
    def __init__(self, daemon):
        self.daemon = daemon

    def _loop_ok(self) -> bool:
        async def noop():
            return True
        try:
            return bool(self.daemon.http.on_loop(noop(), timeout=LOOP_TIMEOUT_S))
        except HttpError:
            return False

    def _lease(self) -> tuple[bool, bool]:
        membership = self.daemon.membership
        registered = membership is not None and membership.registered
        fence = getattr(self.daemon, "fence", None)
        return registered, registered and fence is not None and fence.valid()

    def live(self, request) -> tuple:
        ok = self._loop_ok()
        return _answer(ok, "" if ok else "event loop not answering")

    def etcd(self, request) -> tuple:
        registered, lease_valid = self._lease()
        ok, reason = readiness(loop_ok=True, registered=registered, lease_valid=lease_valid,
                               draining=False)
        return _answer(ok, reason)

    def ready(self, request) -> tuple:
        registered, lease_valid = self._lease()
        return _answer(*readiness(loop_ok=self._loop_ok(), registered=registered,
                                  lease_valid=lease_valid, draining=self.daemon.drain.draining))


def health_routes(daemon) -> list:
    """The three public health routes of `daemon`'s HTTP server."""
    health = _Health(daemon)
    return [Route("GET", r"/api/local_raylet_healthz", health.live, public=True),
            Route("GET", r"/api/gcs_healthz", health.etcd, public=True),
            Route("GET", r"/api/healthz", health.ready, public=True)]

