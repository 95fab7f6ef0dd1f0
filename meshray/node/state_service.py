"""A node's part in the state API: its own records, and the cluster's on request.

Any node answers any state query (there is no head to ask): the node a
client asks sends the query to every live member of its view at once,
answers its own part, and merges (node/state_queries.py). A member that does
not answer within the query's timeout is named in the answer's ``missing``
map rather than left out silently; the client decides whether that is an
error (Ray's ``raise_on_missing_output``).

Actors, nodes and placement groups are recorded in etcd, so the node asked
answers for them alone, from etcd.

The service is composed into the daemon with what it reads — record
sources, the membership view and a way to ask a peer — so it holds no node
state of its own.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, Iterable, Mapping

from meshray.node import state_queries as queries

__all__ = ["StateService", "DEFAULT_TIMEOUT_S", "MAX_TIMEOUT_S"]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 30.0
MAX_TIMEOUT_S = 600.0


def _timeout(payload: dict) -> float:
    value = payload.get("timeout", DEFAULT_TIMEOUT_S)
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0 < value <= MAX_TIMEOUT_S:
        raise ValueError(f"timeout={value!r}: expected seconds, more than 0 and at most "
                         f"{MAX_TIMEOUT_S:.0f}")
    return float(value)


class StateService:
    def __init__(self, node_hex: str, sources: Mapping[str, Callable[[], Iterable[dict]]], *,
                 cluster_sources: Mapping[str, Callable[[], Awaitable[list]]],
                 members: Callable[[], list], ask_peer: Callable[..., Awaitable[dict]],
                 dropped: Callable[[str], int] = lambda resource: 0,
                 counted: Callable[[str], tuple] = lambda resource: (0, {})):
        self.node_hex = node_hex
        self._sources = dict(sources)
        self._cluster_sources = dict(cluster_sources)
        self._members = members
        self._ask_peer = ask_peer
        self._dropped = dropped
        self._counted = counted    # resource -> (calls counted not listed, their summary)

    # ------------------------------------------------------------ this node
    async def ask_local(self, conn, payload: dict) -> dict:
        """This node's page (or summary) for a query: the `state_local` question."""
        return self._local(payload)

    def _local(self, payload: dict) -> dict:
        query = queries.check_query(payload)
        if query.resource not in self._sources:
            raise ValueError(f"resource={query.resource!r}: answered from etcd by the node "
                             "asked (state_query), not node by node")
        records = self._sources[query.resource]()
        counted, counted_summary = self._counted(query.resource)
        if payload.get("summary"):
            summary = queries.summarize(records, query)
            if not query.filters:      # counted calls have no fields to filter on
                summary = queries.merge_summaries([summary, counted_summary])
            return {"summary": summary}
        page = queries.local_page(records, query)
        page["dropped"] = self._dropped(query.resource)
        page["counted"] = counted
        return page

    # ------------------------------------------------------------ the cluster
    async def ask_cluster(self, conn, payload: dict) -> dict:
        """Every live member's answer merged: the `state_query` question."""
        query = queries.check_query(payload)    # refuse a bad query before asking anyone
        timeout = _timeout(payload)
        if query.resource in self._cluster_sources:
            started = time.monotonic()
            records = await asyncio.wait_for(self._cluster_sources[query.resource](), timeout)
            if payload.get("summary"):
                return {"summary": queries.summarize(records, query),
                        "nodes": [self.node_hex], "missing": {},
                        "elapsed_s": time.monotonic() - started}
            merged = queries.merge_pages({self.node_hex: queries.local_page(records, query)},
                                         query)
            merged["elapsed_s"] = time.monotonic() - started
            return merged
        local_payload = {k: v for k, v in payload.items() if k != "timeout"}
        peers = [n for n in self._members() if n != self.node_hex]
        started = time.monotonic()
        answers = await asyncio.gather(
            *(self._ask_peer(node, "state_local", local_payload, timeout) for node in peers),
            return_exceptions=True)
        results = {self.node_hex: self._local(local_payload)}
        missing = {}
        for node, answer in zip(peers, answers):
            if isinstance(answer, BaseException):
                missing[node] = f"{type(answer).__name__}: {answer}" if str(answer) \
                    else type(answer).__name__
            else:
                results[node] = answer
        if missing:
            log.info("state query on %s: %d of %d nodes did not answer within %.0fs",
                     query.resource, len(missing), len(peers) + 1, timeout)
        elapsed = time.monotonic() - started
        if payload.get("summary"):
            return {"summary": queries.merge_summaries(r["summary"] for r in results.values()),
                    "nodes": sorted(results), "missing": missing, "elapsed_s": elapsed}
        merged = queries.merge_pages(results, query, missing)
        merged["elapsed_s"] = elapsed
        return merged
