"""Ray's log API (``ray.util.state.list_logs`` / ``get_log``): any node's log files.

The node this process is connected to answers, for its own files or by
asking the node that has them (node/log_service.py says how a task's, an
actor's or a pid's file is found). ``node_id`` defaults to the node this
process is connected to -- there is no head node to default to.

Following a file (``follow=True``) polls the node for what was written after
the last offset, every ``_interval`` seconds (default 0.5); a file rotated
meanwhile is read again from its new start. See docs/observability.md.
"""
from __future__ import annotations

import base64
import codecs
import json
import re
import time
from typing import Dict, Generator, List

from meshray.util.state.common import RayStateApiException

__all__ = ["get_log", "list_logs"]

DEFAULT_FOLLOW_INTERVAL_S = 0.5
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _id_hex(value, name: str) -> str | None:
    if value is None:
        return None
    if hasattr(value, "hex") and not isinstance(value, (str, bytes)):
        value = value.hex()
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name}={value!r}: expected an id as a hex string")
    return value


def _core(address):
    from meshray.core.state import ensure_core, state
    if address is not None and state.core is None:
        import meshray
        meshray.init(address=address, log_to_driver=False)
    return ensure_core()


def _ask(core, method: str, payload: dict, timeout: float):
    """One question to the connected node; its ValueError stays a ValueError."""
    future = core.request_async(method, payload)
    try:
        reply = future.result(timeout + 5)
    except Exception as exc:  # noqa: BLE001 - the node did not answer in time
        raise RayStateApiException(f"{method}: no answer from the node within "
                                   f"{timeout + 5:.0f}s ({type(exc).__name__})") from None
    if reply.error:
        kind, _, text = reply.error.partition(": ")
        if kind == "ValueError":
            raise ValueError(text)
        raise RayStateApiException(f"{method} failed: {reply.error}")
    return json.loads(reply.payload)


def _node_of_ip(core, node_ip: str, timeout: float) -> str:
    nodes = [n for n in core.request("nodes", timeout=timeout)
             if n.get("Alive") and n.get("NodeManagerAddress") == node_ip]
    if len(nodes) != 1:
        raise ValueError(f"node_ip={node_ip!r}: expected the address of exactly one live node "
                         f"(found {len(nodes)}); pass node_id instead")
    return nodes[0]["NodeID"]


def _target(core, node_id, node_ip, timeout) -> str | None:
    if node_id is not None and node_ip is not None:
        raise ValueError("pass node_id or node_ip, not both")
    if node_ip is not None:
        return _node_of_ip(core, node_ip, timeout)
    return _id_hex(node_id, "node_id")


def list_logs(address: str | None = None, node_id: str | None = None,
              node_ip: str | None = None, glob_filter: str | None = None,
              timeout: int = 30, detail: bool = False,
              _interval: float | None = None) -> Dict[str, List]:
    """The log files of one node, by group (``worker_out``, ``worker_err``, ``node``...).

    With ``detail=True`` each file is a dict (filename, size, modified) rather
    than a name.
    """
    core = _core(address)
    payload = {"node_id": _target(core, node_id, node_ip, timeout), "glob": glob_filter,
               "detail": bool(detail), "timeout": timeout}
    return _ask(core, "list_logs", payload, timeout)["logs"]


def get_log(address: str | None = None, node_id: str | None = None,
            node_ip: str | None = None, filename: str | None = None,
            actor_id: str | None = None, task_id: str | None = None, pid: int | None = None,
            follow: bool = False, tail: int = -1, timeout: int = 30, suffix: str = "out",
            encoding: str | None = "utf-8", errors: str | None = "strict",
            submission_id: str | None = None, attempt_number: int = 0,
            _interval: float | None = None,
            filter_ansi_code: bool = False) -> Generator[str, None, None]:
    """Yield a log file's text, a line at a time (newline included).

    One of ``filename`` (see list_logs), ``actor_id``, ``task_id`` or ``pid``
    names the file; ``suffix`` picks stdout ("out") or stderr ("err") of a
    worker. ``tail`` lines from the end (-1: all); ``follow`` keeps yielding
    what is written after, until the caller stops iterating.
    """
    if submission_id is not None:
        raise ValueError(f"submission_id={submission_id!r}: meshray has no job submission "
                         "server; name the driver's node and file instead")
    if isinstance(tail, bool) or not isinstance(tail, int) or tail < -1:
        raise ValueError(f"tail={tail!r}: expected a number of lines, or -1 for all")
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0):
        raise ValueError(f"pid={pid!r}: expected a process id (a positive int)")
    core = _core(address)
    payload = {"node_id": _target(core, node_id, node_ip, timeout), "filename": filename,
               "actor_id": _id_hex(actor_id, "actor_id"), "task_id": _id_hex(task_id, "task_id"),
               "pid": pid, "suffix": suffix, "tail": tail, "timeout": timeout}
    payload = {k: v for k, v in payload.items() if v is not None}
    return _lines(core, payload, follow, timeout, encoding or "utf-8", errors or "strict",
                  _interval or DEFAULT_FOLLOW_INTERVAL_S, filter_ansi_code)


def _lines(core, payload: dict, follow: bool, timeout: float, encoding: str, errors: str,
           interval: float, filter_ansi: bool):
    decoder = codecs.getincrementaldecoder(encoding)(errors)
    partial = ""
    while True:
        reply = _ask(core, "get_log", payload, timeout)
        data = base64.b64decode(reply["data"])
        if reply.get("rotated"):
            decoder.reset()
        text = partial + decoder.decode(data)
        *lines, partial = text.split("\n")
        for line in lines:
            yield (_ANSI.sub("", line) if filter_ansi else line) + "\n"
        # Later polls name the exact file read and go on from where this ended.
        payload = {**payload, "node_id": reply["node_id"], "filename": reply["filename"],
                   "offset": reply["next_offset"], "file_id": reply["file_id"]}
        for key in ("actor_id", "task_id", "pid", "tail"):
            payload.pop(key, None)
        if reply["next_offset"] < reply["size"]:
            continue                       # more than one reply holds
        if not follow:
            break
        time.sleep(interval)
    partial += decoder.decode(b"", final=True)
    if partial:
        yield _ANSI.sub("", partial) if filter_ansi else partial
