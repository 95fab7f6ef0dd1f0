"""Waiting for a file descriptor to become readable, whatever its number.

`select.select` takes descriptors below FD_SETSIZE (1,024) only, and a
process of a big cluster holds more than that: a node links to every peer
it has sent work to, so a worker started by a node of a 1,000-node cluster
inherits its token pipe as descriptor ~2,000 and `select` refuses it
("filedescriptor out of range"). The platform's selector (epoll here) has
no such limit.
"""
from __future__ import annotations

import selectors

__all__ = ["wait_readable"]


def wait_readable(fd, timeout: float) -> bool:
    """Whether `fd` (a descriptor number or an object with ``fileno()``) is
    readable within `timeout` seconds (at once for 0 or less)."""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        return bool(selector.select(max(0.0, timeout)))
