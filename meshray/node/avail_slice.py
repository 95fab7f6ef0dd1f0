"""Whose availability a node follows: every member's, or a slice of them.

Every node publishes its free resources (``avail/<node id>``) when they
change. Followed by every member, each such write is a delivery at all N
members, and a cluster of N joining nodes pays 2N² deliveries (record and
availability), which is what stopped a thousand hollow nodes from joining
one machine (docs/scale.md). A node needs room figures only for the peers it
might spill to, and a spill decision looks at 8 sampled peers anyway
(cluster_view.py). So once the cluster is big, a node follows the
availability of a *slice*: the members whose ids share its top ``bits``
bits. Availability keys end in the node id, and ids are random, so a slice
is one etcd key range (one watch) holding about members / 2**bits nodes,
kept between SLICE_TARGET and twice that. Node records stay followed in
full: membership, totals, labels, addresses and deaths concern every member.

Alternatives weighed:

- asking k sampled peers for their room at each decision (Sparrow's
  probes): exact, but a round trip before every spill;
- a random subset per node: no single key range, so one watch per peer;
- coarser publishing alone (membership.availability_worth_publishing,
  already in place): fewer writes, but each still reaches every member, and
  a join still costs N² deliveries of availability.

What safety rests on: no availability figure is ever trusted for
correctness. A peer accepts an offer only if its own ledger can start the
work now, so a figure that is missing (a peer outside the slice) or stale
costs a refused offer and a try elsewhere, never an over-commit. A peer
outside the slice that has sent us a batch is judged by the load on it, like
any peer (scheduler/peer_load.py); one we know nothing of is offered work
only when no peer we know of has room (cluster_view.py): it may well have.

The slice narrows as soon as the cluster doubles past a step and widens only
when it shrinks a quarter below it, so a cluster whose size hovers at a step
does not re-watch at every join and leave.

Pure functions: the membership thread (node/membership.py) asks them on
each change of the member list; the cluster view asks `in_slice`.
"""
from __future__ import annotations

__all__ = ["SLICE_TARGET", "ID_BITS", "slice_bits", "slice_bounds", "in_slice", "id_prefix"]

# Members whose availability a node follows, at least (up to twice as many).
SLICE_TARGET = 64
# The bits of a node id (its first 8 hex digits) that slices are cut from.
ID_BITS = 32
_HEX_DIGITS = ID_BITS // 4
# Widen only when the cluster shrank this far below the step it narrowed at.
WIDEN_BELOW = 0.75


def _ideal_bits(members: float, target: int) -> int:
    bits = 0
    while members >= target * (2 ** (bits + 1)) and bits < ID_BITS:
        bits += 1
    return bits


def slice_bits(members: int, current: int = 0, target: int = SLICE_TARGET) -> int:
    """How many top id bits a node's slice shares, for `members` members,
    given the `current` slice (0: every member's availability)."""
    if members < 0 or current < 0 or current > ID_BITS or target < 1:
        raise ValueError(f"members={members!r}, current={current!r}, target={target!r}: "
                         f"expected members >= 0, 0 <= current <= {ID_BITS}, target >= 1")
    ideal = _ideal_bits(members, target)
    if ideal >= current:
        return ideal
    # Fewer members than the current slice was cut for: widen only once the
    # cluster is clearly smaller, to the slice that size calls for.
    if members < target * (2 ** current) * WIDEN_BELOW:
        return _ideal_bits(members / WIDEN_BELOW, target)
    return current


def id_prefix(node_hex: str) -> int | None:
    """The top ID_BITS of a hex id, or None where it is too short or not hex."""
    head = node_hex[:_HEX_DIGITS]
    if len(head) < _HEX_DIGITS:
        return None
    try:
        return int(head, 16)
    except ValueError:
        return None


def slice_bounds(node_hex: str, bits: int) -> tuple[str, str | None] | None:
    """The slice of `node_hex` as (first id prefix, id prefix past the last)
    in hex -- None past the last id -- or None for every member (bits 0)."""
    if bits == 0:
        return None
    if not 0 < bits <= ID_BITS:
        raise ValueError(f"bits={bits!r}: expected 0 to {ID_BITS}")
    own = id_prefix(node_hex)
    if own is None:
        raise ValueError(f"node_hex={node_hex!r}: expected at least {_HEX_DIGITS} hex digits")
    width = 1 << (ID_BITS - bits)
    low = own - own % width
    high = low + width
    return f"{low:0{_HEX_DIGITS}x}", (f"{high:0{_HEX_DIGITS}x}" if high < (1 << ID_BITS)
                                      else None)


def in_slice(peer_hex: str, node_hex: str, bits: int) -> bool:
    """Whether `node_hex`, slicing at `bits`, follows `peer_hex`'s
    availability (an id that is not hex, from etcd, is in no slice)."""
    if bits == 0:
        return True
    peer, own = id_prefix(peer_hex), id_prefix(node_hex)
    if peer is None or own is None:
        return False
    shift = ID_BITS - bits
    return peer >> shift == own >> shift
