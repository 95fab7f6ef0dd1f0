"""Dispatch tables for stream events: one handler per kind of a message's oneof.

A stream event (ClientEvent, ServerEvent, PeerEvent) carries one of several
messages in its `kind` oneof. Its receiver keeps a table from kind to handler,
written out where the receiver is built, and checked here against the
message's descriptor: a kind without a handler (a message added to the
protocol and forgotten) or a handler for no kind fails when the table is made
— at start, and in the unit tests — not when such a message first arrives.
"""
from __future__ import annotations

from typing import Callable, Mapping

__all__ = ["dispatch_table", "event_kinds"]


def event_kinds(message_type) -> frozenset:
    """The kinds an event may carry: the fields of its `kind` oneof."""
    return frozenset(f.name for f in message_type.DESCRIPTOR.oneofs_by_name["kind"].fields)


def dispatch_table(message_type, table: Mapping[str, Callable]) -> dict:
    """`table` as a dict, after checking it covers exactly the kinds of `message_type`."""
    kinds = event_kinds(message_type)
    missing, unknown = kinds - set(table), set(table) - kinds
    if missing or unknown:
        raise ValueError(
            f"dispatch table for {message_type.DESCRIPTOR.full_name}.kind: "
            f"no handler for {sorted(missing)}; handlers for unknown kinds {sorted(unknown)}")
    return dict(table)
