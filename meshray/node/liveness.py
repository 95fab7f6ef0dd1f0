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
the address of a link that just left READY.
"""
from __future__ import annotations

import asyncio
import logging

import grpc

__all__ = ["PeerLiveness", "should_probe", "probe_refused"]

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.1
IDLE_POLL_INTERVAL_S = 1.0
PROBE_TIMEOUT_S = 1.0
_READY = grpc.ChannelConnectivity.READY


def should_probe(previous, current) -> bool:
    """A link that was connected and is not any more: its peer may be gone."""
    return previous is _READY and current is not _READY


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
        self._states: dict[str, object] = {}
        self._probing: set[str] = set()

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            # A node linked to no peer has nothing to poll: it looks again a
            # second later (hundreds of idle hollow nodes share one machine).
            await asyncio.sleep(POLL_INTERVAL_S if self._peers.links else IDLE_POLL_INTERVAL_S)
            links = self._peers.links
            for node_hex in [n for n in self._states if n not in links]:
                del self._states[node_hex]
            for node_hex, link in list(links.items()):
                state = link.channel_state()
                previous = self._states.get(node_hex)
                self._states[node_hex] = state
                if should_probe(previous, state) and node_hex not in self._probing:
                    self._probing.add(node_hex)
                    asyncio.get_running_loop().create_task(self._probe(node_hex, link.address))

    async def _probe(self, node_hex: str, address: str) -> None:
        try:
            record = self._peers.view.nodes.get(node_hex)
            if record is None or node_hex in self._peers.view.known_dead:
                return
            if not await probe_refused(address):
                return
            lease_id = int(record.get("LeaseID") or 0)
            if not lease_id:
                return
            log.warning("node %s refuses connections at %s: its daemon is gone; revoking "
                        "its lease %x so the cluster sees the death now", node_hex, address,
                        lease_id)
            await asyncio.get_running_loop().run_in_executor(
                None, self._revoke, node_hex, lease_id)
        except Exception as exc:  # noqa: BLE001 - the lease expiry still covers it
            log.warning("liveness probe of %s failed: %s", node_hex, exc)
        finally:
            self._probing.discard(node_hex)
