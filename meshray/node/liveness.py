"""Noticing a dead peer before its lease runs out.

Membership is the etcd lease (docs/architecture.md, "etcd"), and a silent peer -- paused,
partitioned, or a machine that vanished -- is only declared dead when its
lease expires. But a peer whose *process* died leaves evidence at once: its
connections close, and its port, on a host that is still up, refuses new
ones. A refusal cannot come from a live daemon (it listens for as long as it
runs), so it is safe to act on: the first peer that sees it revokes the dead
node's lease, and every node sees the death through its watch within
milliseconds instead of a TTL later. Anything else -- a timeout, an
unreachable host -- proves nothing and is left to the lease.

The daemon polls its peer links' channel states (cheap, local) and probes
the address of a link that left READY -- at once, then again with a growing
interval (0.5 s doubling to 5 s) for as long as the link stays out of READY
and its node stays in the view. One probe is not enough: a probe that proves
nothing (a connect that timed out on a loaded machine) or a revocation that
failed (etcd slow to commit) would otherwise leave the death to the lease,
since a dead peer's link never becomes READY again to trigger another. The
repeated probes cost one connect every few seconds per silent peer, and stop
when the view drops the node.
"""
from __future__ import annotations

import asyncio
import logging

import grpc

__all__ = ["LinkWatch", "PeerLiveness", "probe_refused"]

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.1
IDLE_POLL_INTERVAL_S = 1.0
PROBE_TIMEOUT_S = 1.0
FIRST_REPROBE_S = 0.5
MAX_REPROBE_S = 5.0
_READY = grpc.ChannelConnectivity.READY


class LinkWatch:
    """When to probe one peer's link: the decision alone, fed the link's
    state and the time, so it is tested without sockets or clocks.

    A link never READY gives no reason to suspect its peer (it may still be
    connecting). Once it was READY, every observation out of READY is
    suspicious; probes are spaced by an interval that starts at
    FIRST_REPROBE_S and doubles to MAX_REPROBE_S, and a return to READY
    resets it, so the next departure is probed at once.
    """

    def __init__(self):
        self.was_ready = False
        self._next_probe = 0.0
        self._interval = FIRST_REPROBE_S

    def observe(self, state, now: float) -> bool:
        """Record `state` seen at `now`; True when the peer's port is to be probed."""
        if state is _READY:
            self.was_ready = True
            self._next_probe = 0.0
            self._interval = FIRST_REPROBE_S
            return False
        if not self.was_ready or now < self._next_probe:
            return False
        self._next_probe = now + self._interval
        self._interval = min(self._interval * 2, MAX_REPROBE_S)
        return True


async def probe_refused(address: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True only when a TCP connect to host:port is actively refused."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return False
    try:
        _reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host.strip("[]"), int(port)), timeout)
    except ConnectionRefusedError:
        return True
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return False


class PeerLiveness:
    """Runs on the daemon's loop over the node's peer duties (their links and
    view); `revoke(node_hex, lease_id)` is called off it."""

    def __init__(self, peers, revoke):
        self._peers = peers
        self._revoke = revoke
        self._watches: dict[str, LinkWatch] = {}
        self._probing: set[str] = set()

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            # A node linked to no peer has nothing to poll: it looks again a
            # second later (hundreds of idle hollow nodes share one machine).
            await asyncio.sleep(POLL_INTERVAL_S if self._peers.links else IDLE_POLL_INTERVAL_S)
            self.poll(asyncio.get_running_loop().time())

    def poll(self, now: float) -> None:
        """Look at every link once; start the probes that are due."""
        links = self._peers.links
        for node_hex in [n for n in self._watches if n not in links]:
            del self._watches[node_hex]
        for node_hex, link in list(links.items()):
            watch = self._watches.get(node_hex)
            if watch is None:
                watch = self._watches[node_hex] = LinkWatch()
            if watch.observe(link.channel_state(), now) and node_hex not in self._probing:
                self._probing.add(node_hex)
                asyncio.get_running_loop().create_task(self._probe(node_hex, link.address))

    async def _probe(self, node_hex: str, address: str) -> None:
        try:
            record = self._peers.view.nodes.get(node_hex)
            if record is None or node_hex in self._peers.view.known_dead:
                return
            if not await probe_refused(address):
                log.debug("probe of node %s at %s proved nothing; probing again later",
                          node_hex, address)
                return
            lease_id = int(record.get("LeaseID") or 0)
            if not lease_id:
                return
            log.warning("node %s refuses connections at %s: its daemon is gone; revoking "
                        "its lease %x so the cluster sees the death now", node_hex, address,
                        lease_id)
            await asyncio.get_running_loop().run_in_executor(
                None, self._revoke, node_hex, lease_id)
        except Exception as exc:  # noqa: BLE001 - the next probe, or the lease, covers it
            log.warning("liveness probe of %s failed (probing again later): %s", node_hex, exc)
        finally:
            self._probing.discard(node_hex)
