"""A peer's room for spilled work, from the freshest report this node has.

Pure functions (no I/O, no state) behind the node daemon's spill offers; the
placement policy (policy.py) stays unaware of where its view comes from.

A node learns how busy a peer is in two ways:

- the etcd view: every node publishes its free resources when they change,
  at most every PUBLISH_INTERVAL_S (a change too small to matter waits up
  to about a second: membership.availability_worth_publishing), so a value
  lags by up to that much plus the watch delay;
- the load a peer attaches to every batch of peer events it sends us
  (PeerBatch.load): its free resources, and how many more offers it would
  queue behind its busy workers, as of the moment it sent the batch. Such a
  batch usually carries the verdicts and results of the work we spilled
  there, so it is the freshest word on exactly the peers we keep fed.

From the newer of the two, less the offers still unanswered, the daemon
builds the views policy.decide sees (`peer_room`). A peer with no free room
but backlog left gets a second chance (`with_backlog`): the daemon asks the
policy again with such peers shown as fitting the task, so work queues there
only when no peer could start it at once -- and only while it would start
there sooner than it would here (`worth_queueing`): a backlog filled to its
limit at the end of a burst left this node idle while its peers still had
tasks queued (3 one-CPU nodes, 60 ten-millisecond tasks: the submitting node
ran 19 and sat idle for the last ~25 ms of ~230).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional

__all__ = ["LOAD_TRUSTED_S", "backlog_left", "newest_available", "peer_room", "total_of",
           "with_backlog", "worth_queueing"]

# An etcd value that arrives this soon after a batch's load may have been
# published before that batch was sent (= membership.PUBLISH_INTERVAL_S).
LOAD_TRUSTED_S = 0.1


def newest_available(etcd_available: Mapping[str, float], etcd_changed_at: Optional[float],
                     load_available: Optional[Mapping[str, float]], load_at: Optional[float],
                     now: float, trusted_s: float = LOAD_TRUSTED_S) -> dict:
    """The peer's free resources by the newer report.

    A batch's load wins when it arrived after the etcd value last changed,
    or less than `trusted_s` ago (an etcd value seen since then may still
    predate it); otherwise the etcd value is newer. Times are this node's
    monotonic clock, at receipt.
    """
    if load_available is None or load_at is None:
        return dict(etcd_available)
    if etcd_changed_at is None or load_at >= etcd_changed_at or now - load_at < trusted_s:
        return dict(load_available)
    return dict(etcd_available)


def total_of(requests: Iterable[Mapping[str, float]]) -> dict:
    """The sum of several resource requests (the unanswered offers to a peer)."""
    total: dict = {}
    for request in requests:
        for name, amount in request.items():
            total[name] = total.get(name, 0.0) + amount
    return total


def peer_room(available: Mapping[str, float], offered: Mapping[str, float]) -> dict:
    """Free resources less what unanswered offers may take (never negative)."""
    room = dict(available)
    for name, amount in offered.items():
        room[name] = max(0.0, room.get(name, 0.0) - amount)
    return room


def backlog_left(backlog_room: int, offers_in_flight: int) -> int:
    """Queue places a peer still has for offers, after those not yet answered."""
    return max(0, int(backlog_room) - int(offers_in_flight))


def worth_queueing(peer_queued: int, offers_in_flight: int, peer_cpus: float,
                   local_waiting_per_cpu: float) -> bool:
    """Would a task queued at the peer now start before the last task waiting here?

    Tasks of a burst take alike long, so a queue's wait is its length per
    CPU: the task would be behind the peer's queued tasks and our offers not
    yet answered, and moving it spares the last one waiting here the wait
    of the whole local queue. Equal waits keep it here (no transfer for
    nothing). Counts, not durations: the node does not know how long tasks
    will run, and the peer's backlog limit still bounds what it queues.
    """
    peer_wait = (int(peer_queued) + int(offers_in_flight) + 1) / max(1.0, float(peer_cpus))
    return peer_wait < local_waiting_per_cpu


def with_backlog(room: Mapping[str, float], total: Mapping[str, float],
                 request: Mapping[str, float], backlog: int) -> dict:
    """`room` as the policy should see it when the peer may queue `request`.

    With backlog left and a total that fits the request, the peer is shown
    with just enough room for it (it would accept and queue it); otherwise
    `room` is unchanged.
    """
    out = dict(room)
    if backlog <= 0 or any(total.get(name, 0.0) < amount for name, amount in request.items()):
        return out
    for name, amount in request.items():
        out[name] = max(out.get(name, 0.0), amount)
    return out
