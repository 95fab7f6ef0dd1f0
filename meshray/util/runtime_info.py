"""Where am I, and which actors have names (`ray.util.list_named_actors`,
`ray.util.get_node_ip_address`).

Named actors are read from the actor records in etcd (through the local
node's ``list_actors`` request), so an actor started anywhere in the
cluster is listed, by any process. Records are treated as untrusted input:
one without a string name and namespace is skipped, not trusted to be
well-formed. An actor whose record is not written yet (still being placed)
is not listed yet.
"""
from __future__ import annotations

import socket
from typing import List, Union

from meshray.core import state as state_mod

__all__ = ["list_named_actors", "get_node_ip_address"]


def _live_named(records) -> list:
    """(namespace, name) of every named actor that is not DEAD, sorted, once each."""
    found = set()
    for record in records if isinstance(records, list) else []:
        if not isinstance(record, dict) or record.get("state") == "DEAD":
            continue
        name, namespace = record.get("name"), record.get("namespace", "")
        if isinstance(name, str) and name and isinstance(namespace, str):
            found.add((namespace, name))
    return sorted(found)


def list_named_actors(all_namespaces: bool = False) -> List[Union[str, dict]]:
    """The names of the live named actors in this job's namespace, or with
    `all_namespaces`, ``{"name": ..., "namespace": ...}`` for every namespace."""
    if not isinstance(all_namespaces, bool):
        raise TypeError(f"list_named_actors() argument all_namespaces={all_namespaces!r} "
                        "must be a bool")
    records = state_mod.ensure_core().request("list_actors")
    named = _live_named(records)
    if all_namespaces:
        return [{"name": name, "namespace": namespace} for namespace, name in named]
    current = state_mod.state.namespace
    return [name for namespace, name in named if namespace == current]


def get_node_ip_address(address: str = "8.8.8.8:53") -> str:
    """The IP address of this process's node.

    Connected: the host the local node daemon advertises to its peers.
    Not connected: the local address the kernel would route to `address`
    from (a UDP connect sends nothing), or 127.0.0.1 without a route.
    """
    core = state_mod.state.core
    advertised = getattr(core, "node_address", "") if core is not None else ""
    if advertised and not advertised.startswith("unix:"):
        host = advertised.rsplit(":", 1)[0]
        return host.strip("[]")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"get_node_ip_address() argument address={address!r} must be "
                         "'host:port'")
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((host.strip("[]"), int(port)))
            return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"
