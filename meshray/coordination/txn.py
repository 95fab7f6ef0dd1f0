"""Transaction building blocks: the compares and ops :meth:`Coordinator.txn`
takes, the result it returns, and etcd's limit on their number.

A module of its own because callers that plan transactions (placement
reservation, membership, actor hosting) need only these small value types;
``client.py`` offers them too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MAX_TXN_OPS",
    "KeyMissing",
    "ModRevisionEquals",
    "ValueEquals",
    "Put",
    "Delete",
    "Get",
    "TxnResult",
]

MAX_TXN_OPS = 128
"""etcd's default ``--max-txn-ops``. meshray counts compares and both branches
together, which is stricter than etcd (it limits each list separately) and so
stays valid if a server is configured a little lower."""


# --------------------------------------------------------------------------
# Compares, ops and results


@dataclass(frozen=True)
class KeyMissing:
    key: str | bytes


@dataclass(frozen=True)
class ModRevisionEquals:
    """True when ``key``'s last modification is ``revision`` (0: missing)."""

    key: str | bytes
    revision: int


@dataclass(frozen=True)
class ValueEquals:
    """True when ``key`` exists and holds exactly ``value``."""

    key: str | bytes
    value: bytes | str


@dataclass(frozen=True)
class Put:
    key: str | bytes
    value: bytes | str
    lease: int | None = None


@dataclass(frozen=True)
class Delete:
    key: str | bytes


@dataclass(frozen=True)
class Get:
    key: str | bytes


@dataclass(frozen=True)
class TxnResult:
    """Outcome of :meth:`Coordinator.txn`.

    ``responses`` has one entry per op of the branch that ran: ``None`` for
    Put, the number of deleted keys for Delete, ``(value | None,
    mod_revision)`` for Get. ``revision`` is the store revision after the
    transaction.
    """

    succeeded: bool
    responses: list[Any] = field(default_factory=list)
    revision: int = 0

