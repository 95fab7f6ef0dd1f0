"""A node's answers to ``list_logs`` and ``get_log``, for its own files or a peer's.

Any node answers for any node's logs: it answers for its own files, and
forwards a question about another node's to that node (one hop: a forwarded
question that names yet another node is refused, so no question travels in
circles). Which file holds what is found where the facts are:

- ``filename``: the named node (default: the node asked);
- ``pid``: the newest ``worker-*-*-<pid>.<suffix>`` on the named node;
- ``actor_id``: the actor's record (etcd) names its node and pid;
- ``task_id``: the task-events record of the node that ran it names the
  worker; the node asked looks in its own records, then asks every peer.

A task's file is its worker's whole file: a pooled worker runs many tasks,
and the file marks each change of job or task (``:task_name:<name>``).

Every question is untrusted input: its fields are checked here, and file
names are checked and opened by meshray/node/log_files.py, never joined into
paths. Files are read off the event loop.

``get_log`` answers one chunk (at most ``log_files.MAX_READ_BYTES``, base64)
with the offset to ask from next; following a file is polling with that
offset (the client does it: questions are request and reply).
"""
from __future__ import annotations

import asyncio
import base64
import os
import re
from dataclasses import dataclass
from typing import Awaitable, Callable

from meshray.node import log_files
from meshray.node.state_service import DEFAULT_TIMEOUT_S
from meshray.node.state_service import _timeout   # the state API's timeout rule, shared

__all__ = ["LogService", "GetRequest", "check_get_request", "check_list_request",
           "DEFAULT_TIMEOUT_S"]

_HEX = re.compile(r"[0-9a-f]{2,128}")
_SUFFIXES = ("out", "err")


def _hex_field(payload: dict, name: str) -> str | None:
    value = payload.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not _HEX.fullmatch(value.lower()):
        raise ValueError(f"{name}={value!r}: expected a hex id string")
    return value.lower()


def _int_field(payload: dict, name: str, default, minimum: int):
    value = payload.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: expected a whole number >= {minimum}")
    return value


def check_list_request(payload: dict) -> dict:
    """The checked fields of a list_logs question."""
    glob = payload.get("glob")
    if glob is not None and (not isinstance(glob, str) or len(glob) > 255 or "/" in glob):
        raise ValueError(f"glob={glob!r}: expected a file name pattern (no '/')")
    return {"node_id": _hex_field(payload, "node_id"), "glob": glob or None,
            "detail": bool(payload.get("detail", False)), "timeout": _timeout(payload)}


@dataclass(frozen=True)
class GetRequest:
    node_id: str | None
    filename: str | None
    actor_id: str | None
    task_id: str | None
    pid: int | None
    suffix: str
    tail: int
    offset: int | None
    file_id: str | None
    limit: int
    timeout: float


def check_get_request(payload: dict) -> GetRequest:
    """The checked fields of a get_log question; ValueError names what is wrong."""
    filename = payload.get("filename")
    if filename is not None:
        log_files.check_filename(filename)
    request = GetRequest(
        node_id=_hex_field(payload, "node_id"), filename=filename,
        actor_id=_hex_field(payload, "actor_id"), task_id=_hex_field(payload, "task_id"),
        pid=_int_field(payload, "pid", None, 1), suffix=payload.get("suffix", "out"),
        tail=_int_field(payload, "tail", -1, -1), offset=_int_field(payload, "offset", None, 0),
        file_id=payload.get("file_id"),
        limit=min(_int_field(payload, "limit", log_files.MAX_READ_BYTES, 1),
                  log_files.MAX_READ_BYTES),
        timeout=_timeout(payload))
    chosen = [n for n in ("filename", "actor_id", "task_id", "pid")
              if getattr(request, n) is not None]
    if len(chosen) != 1:
        raise ValueError(f"get_log needs exactly one of filename, actor_id, task_id or pid "
                         f"(got {', '.join(chosen) or 'none'})")
    if request.suffix not in _SUFFIXES:
        raise ValueError(f"suffix={request.suffix!r}: expected 'out' or 'err'")
    if request.file_id is not None and not isinstance(request.file_id, str):
        raise ValueError(f"file_id={request.file_id!r}: expected the file_id of an earlier reply")
    return request


class PeerError(Exception):
    """A peer's answer was an error (its text carries the peer's error type)."""


class LogService:
    """This node's log questions; composed with what it reads (see log_service_for)."""

    def __init__(self, node_hex: str, logs_dir_fd: int, session_dir_fd: int, *,
                 task_record: Callable[[str], dict | None],
                 actor_record: Callable[[str], Awaitable[dict | None]],
                 live_worker_of: Callable[[int], str | None],
                 members: Callable[[], list],
                 ask_peer: Callable[..., Awaitable[dict]]):
        self.node_hex = node_hex
        self._logs_fd = logs_dir_fd
        self._session_fd = session_dir_fd
        self._task_record = task_record
        self._actor_record = actor_record
        self._live_worker_of = live_worker_of
        self._members = members
        self._ask_peer = ask_peer

    def close(self) -> None:
        os.close(self._session_fd)

    # -------------------------------------------------- list_logs
    async def ask_list(self, conn, payload: dict) -> dict:
        request = check_list_request(payload)
        node = request["node_id"]
        if node is not None and node != self.node_hex:
            return await self._forward(node, "list_logs", payload, request["timeout"])
        files = await asyncio.get_running_loop().run_in_executor(
            None, log_files.list_files,
            [(self._logs_fd, None), (self._session_fd, list(SESSION_LOGS))], request["glob"])
        groups: dict[str, list] = {}
        for record in files:
            entry = record if request["detail"] else record["filename"]
            groups.setdefault(record["group"], []).append(entry)
        return {"node_id": self.node_hex, "logs": groups}

    # -------------------------------------------------- get_log
    async def ask_get(self, conn, payload: dict) -> dict:
        request = check_get_request(payload)
        forwarded = bool(payload.get("forwarded"))
        node = request.node_id
        if request.actor_id is not None and node is None:
            node, pid = await self._actor_location(request.actor_id)
            if node != self.node_hex:
                return await self._forward(node, "get_log", payload, request.timeout)
        if node is not None and node != self.node_hex:
            if forwarded:
                raise ValueError(f"node_id={node}: this node ({self.node_hex}) was asked "
                                 "for another node's log by a peer")
            return await self._forward(node, "get_log", payload, request.timeout)
        if request.task_id is not None and node is None and not forwarded:
            record = self._task_record(request.task_id)
            if record is None or not record.get("worker_pid"):
                if record is not None and record.get("spilled_to"):
                    return await self._forward(record["spilled_to"], "get_log", payload,
                                               request.timeout)
                return await self._ask_everyone(payload, request, record)
        name, dir_fd = await self._resolve(request)
        try:
            reply = await asyncio.get_running_loop().run_in_executor(
                None, lambda: log_files.read_log(dir_fd, name, offset=request.offset,
                                                 tail=request.tail, file_id=request.file_id,
                                                 limit=request.limit))
        except FileNotFoundError:
            raise ValueError(f"filename={name!r}: node {self.node_hex} has no such log file "
                             "(list_logs names them)") from None
        except OSError as exc:     # a symlink (O_NOFOLLOW), a FIFO, no permission...
            raise ValueError(f"filename={name!r}: not readable as a log file on node "
                             f"{self.node_hex} ({exc.strerror})") from None
        reply["data"] = base64.b64encode(reply["data"]).decode()
        reply["node_id"] = self.node_hex
        return reply

    async def _resolve(self, request: GetRequest) -> tuple[str, int]:
        """(file name, directory fd) on this node for a checked request."""
        if request.filename is not None:
            if request.filename in SESSION_LOGS:
                return request.filename, self._session_fd
            return request.filename, self._logs_fd
        if request.task_id is not None:
            record = self._task_record(request.task_id)
            if record is None:
                raise ValueError(f"task_id={request.task_id}: node {self.node_hex} has no "
                                 "record of this task")
            if not record.get("worker_pid"):
                raise ValueError(f"task_id={request.task_id}: the task has not started on a "
                                 f"worker (state {record.get('state')})")
            return log_files.worker_log_name(record["worker_id"], record["worker_pid"],
                                             request.suffix), self._logs_fd
        pid = request.pid
        if request.actor_id is not None:
            _node, pid = await self._actor_location(request.actor_id)
        return await self._file_of_pid(pid, request.suffix), self._logs_fd

    async def _file_of_pid(self, pid: int, suffix: str) -> str:
        worker_hex = self._live_worker_of(pid)
        if worker_hex is not None:
            return log_files.worker_log_name(worker_hex, pid, suffix)
        files = await asyncio.get_running_loop().run_in_executor(
            None, log_files.list_files, [(self._logs_fd, None)], f"worker-*-*-{pid}.{suffix}")
        if not files:
            raise ValueError(f"pid={pid}: node {self.node_hex} has no worker log of that pid")
        return max(files, key=lambda f: f["modified"])["filename"]

    async def _actor_location(self, actor_hex: str) -> tuple[str, int]:
        record = await self._actor_record(actor_hex)
        if record is None:
            raise ValueError(f"actor_id={actor_hex}: no such actor")
        node, pid = record.get("node_id"), record.get("pid")
        if not isinstance(node, str) or not _HEX.fullmatch(node) or not isinstance(pid, int) \
                or pid <= 0:
            raise ValueError(f"actor_id={actor_hex}: the actor has no worker yet "
                             f"(state {record.get('state')!r})")
        return node, pid

    async def _ask_everyone(self, payload: dict, request: GetRequest, record) -> dict:
        """A task this node did not run (or has no record of): the peer that ran it answers."""
        peers = [n for n in self._members() if n != self.node_hex]
        answers = await asyncio.gather(
            *(self._forward(n, "get_log", payload, request.timeout) for n in peers), return_exceptions=True)
        for answer in answers:
            if not isinstance(answer, BaseException):
                return answer
        if record is not None:
            raise ValueError(f"task_id={request.task_id}: the task has not started on a worker "
                             f"(state {record.get('state')})")
        raise ValueError(f"task_id={request.task_id}: no live node has a record of this task "
                         f"({len(peers) + 1} asked)")

    async def _forward(self, node: str, method: str, payload: dict, timeout: float) -> dict:
        """Ask `node`; its ValueError (a bad request, a missing file) stays a ValueError."""
        try:
            return await self._ask_peer(
                node, method, {**payload, "node_id": node, "forwarded": True}, timeout)
        except ConnectionError as exc:
            raise ValueError(f"node_id={node}: {exc}") from None
        except asyncio.TimeoutError:
            raise TimeoutError(f"node {node} did not answer {method} within "
                               f"{timeout:.0f}s") from None
        except RuntimeError as exc:
            text = str(exc)
            marker = text.find("ValueError: ")
            if marker >= 0:
                raise ValueError(f"node {node}: {text[marker + len('ValueError: '):]}") from None
            raise


# The node's own log files, kept in the session dir rather than logs/.
SESSION_LOGS = ("node.log", "node.stderr")


def log_service_for(node) -> LogService:
    """The daemon's LogService: what it reads from the node's tables."""
    from meshray.common.private_files import open_private_dir

    session_fd = open_private_dir(node.config.session_dir, what="session dir")

    def task_record(task_hex: str):
        found = None
        for record in node.task_events.records():
            if record.get("task_id") == task_hex:
                found = record
        return found

    async def actor_record(actor_hex: str):
        for record in await node.hosting.ask_list_actors(None, {}):
            if isinstance(record, dict) and record.get("actor_id") == actor_hex:
                return record
        return None

    def live_worker_of(pid: int):
        for worker in (node.pool.by_id.values() if node.pool else ()):
            if worker.pid == pid:
                return worker.worker_id.hex()
        return None

    return LogService(
        node.node_hex, node.log_writer.dir_fd, session_fd, task_record=task_record,
        actor_record=actor_record, live_worker_of=live_worker_of,
        members=lambda: list(node.peers.view.nodes) or [node.node_hex],
        ask_peer=node.peers.ask)

