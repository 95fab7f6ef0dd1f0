"""Rules every well-formed meshray message follows, whichever server reads it.

The node's request checks (node/request_rules.py) and the actor's call checks
(core/call_rules.py) are built from these: id lengths (meshray.common.ids),
counts in range, JSON where JSON is expected, and pickles that are at least
framed as pickles. A request that breaks one is answered INVALID_ARGUMENT by
rpc/strict.py before any handler sees it. What a handler can only judge
against its own state (an unknown task, an actor that has gone) is not
malformed and is answered as before.

Pickled payloads are the caller's data: their *framing* is checked here (a
protocol header first, the STOP opcode last), their content is unpickled
only by the process that uses it, which reports a failure as the task's error.

Every failure is a `Malformed` whose message names the field by its path in
the request (``events[2].submit.spec.num_returns``), the value, and what was
expected.
"""
from __future__ import annotations

import json
import re

from meshray.common import ids
from meshray.rpc.strict import Malformed

__all__ = [
    "FUNCTION_ID_LEN", "JOB_ID_LEN", "MAX_NUM_RETURNS", "NODE_ID_LEN", "WORKER_ID_LEN",
    "check_common_spec", "check_env_vars", "check_id", "check_ids", "check_int_at_least",
    "check_json", "check_retry_types",
    "check_node_hex", "check_object_ids", "check_object_value", "check_pickle",
    "check_runtime_env", "check_task_result", "fail", "pickle_problem",
]

NODE_ID_LEN = 16
WORKER_ID_LEN = 16
FUNCTION_ID_LEN = 16
JOB_ID_LEN = 8
# The most return values one task or actor call may declare. A node makes an
# object entry per return at submission, and a failed call carries its error
# once per return, so a count beyond any real use would only stall the
# server; the public API refuses the same bound first.
MAX_NUM_RETURNS = 10_000
_HEX_NODE = re.compile(r"[0-9a-f]{%d}" % (2 * NODE_ID_LEN))
_PROTO, _FRAME, _STOP = 0x80, 0x95, ord(".")


def _show(value) -> str:
    """A value for an error message, cut short so that a huge field stays readable."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value[:24])
        return f"{len(value)} bytes ({data.hex()}{'...' if len(value) > 24 else ''})"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def render(where: tuple, name: str = "") -> str:
    """A field's path from its parts: ("events", 2, "submit"), "spec" -> events[2].submit.spec.

    Checks pass these tuples around and build the text only for a refusal:
    on the hot path (every task, every actor call) formatting would cost more
    than the checks themselves.
    """
    text = ""
    for part in (*where, name) if name else where:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part:
            text += f".{part}" if text else part
    return text


def fail(where: tuple, name: str, value, expected: str):
    raise Malformed(f"{render(where, name)}={_show(value)}: expected {expected}")


def check_id(value: bytes, length: int, where: tuple, name: str, what: str,
             optional: bool = False) -> None:
    if len(value) != length and (value or not optional):
        fail(where, name, value, f"{'empty or ' if optional else ''}a {length}-byte {what}")


def check_ids(values, length: int, where: tuple, name: str, what: str) -> None:
    for index, value in enumerate(values):
        if len(value) != length:
            fail((*where, name), index, value, f"a {length}-byte {what}")


def check_object_ids(values, where: tuple, name: str) -> None:
    if values:
        check_ids(values, ids.OBJECT_ID_LEN, where, name, "object id")


def pickle_problem(blob) -> str | None:
    """Why `blob` is not framed as a pickle (protocol 2 to 5), or None.

    Cheap and never unpickles: a PROTO header, a first FRAME that fits, and
    the STOP opcode last. Random or truncated bytes fail it; a damaged pickle
    with intact framing fails later, where it is loaded.
    """
    size = len(blob)
    if size < 3 or blob[0] != _PROTO or not 2 <= blob[1] <= 5:
        return "a pickle (protocol 2 to 5 header)"
    if blob[size - 1] != _STOP:
        return "a complete pickle (ending with the STOP opcode)"
    if blob[2] == _FRAME and (size < 11 or 11 + int.from_bytes(blob[3:11], "little") > size):
        return "a pickle whose first frame fits in it"
    return None


def check_pickle(blob, where: tuple, name: str, optional: bool = True) -> None:
    if not blob and optional:
        return
    problem = pickle_problem(blob)
    if problem is not None:
        fail(where, name, blob, problem)


def check_json(text, where: tuple, name: str, *, want_object: bool = True):
    """The decoded JSON `text` (an object unless want_object=False)."""
    try:
        value = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        fail(where, name, text, f"JSON ({exc})")
    if want_object and not isinstance(value, dict):
        fail(where, name, text, "a JSON object")
    return value


def check_int_at_least(value, minimum: int, where: tuple, name: str) -> None:
    if value < minimum:
        fail(where, name, value, f"an integer >= {minimum}")


def check_node_hex(text: str, where: tuple, name: str, optional: bool = True) -> None:
    if (text or not optional) and not _HEX_NODE.fullmatch(text):
        fail(where, name, text, f"{'empty or ' if optional else ''}a node id "
             f"({2 * NODE_ID_LEN} lower-case hex digits)")


def _address_list(text: str, where: tuple, name: str) -> None:
    """Comma-separated "host:port" / "unix:/path" addresses (an actor's)."""
    from meshray.rpc.factory import split_host_port
    for part in text.split(","):
        if part.startswith("unix:") and len(part) > 5:
            continue
        try:
            split_host_port(part)
        except ValueError:
            fail(where, name, text, "comma-separated HOST:PORT or unix:PATH addresses")


# ------------------------------------------------------------------ values
def check_object_value(value, where: tuple) -> None:
    check_id(value.object_id, ids.OBJECT_ID_LEN, where, "object_id", "object id")
    if value.in_store:
        inline = value.inline_data
        if inline:
            fail(where, "inline_data", inline,
                 "no inline bytes for a value in the store (in_store=true)")
        check_node_hex(value.location, where, "location")
    else:
        if value.location:
            fail(where, "location", value.location, "no location for an inline value")
        check_pickle(value.inline_data, where, "inline_data", optional=not value.is_error)
    check_object_ids(value.contained_ids, where, "contained_ids")


def check_task_result(result, where: tuple) -> None:
    check_id(result.task_id, ids.TASK_ID_LEN, where, "task_id", "task id")
    returns = result.returns
    for index, value in enumerate(returns):
        check_object_value(value, (*where, "returns", index))
    if result.stream_item_id:
        check_id(result.stream_item_id, ids.OBJECT_ID_LEN, where, "stream_item_id", "object id")
        if len(returns) != 1:
            fail(where, "returns", f"{len(returns)} values",
                 "exactly one value with a stream_item_id")
    if result.actor_address:
        _address_list(result.actor_address, where, "actor_address")


# ------------------------------------------------------------------ task specs
def check_env_vars(env_vars, where: tuple) -> None:
    for key, value in env_vars.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            fail((*where, "env_vars"), repr(key), value,
                 "environment variables named without '=' or NUL, valued without NUL")


def check_runtime_env(text: str, where: tuple, name: str) -> None:
    env = check_json(text, where, name)
    packages = env.get("_packages", {})
    if not isinstance(packages, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in packages.items()):
        fail((*where, name), "_packages", packages, "a map of package URI to object id (hex)")


def check_retry_types(spec, where: tuple) -> None:
    if spec.retry_exception_types:
        if not spec.retry_exceptions:
            fail(where, "retry_exception_types", spec.retry_exception_types,
                 "none without retry_exceptions=true")
        check_pickle(spec.retry_exception_types, where, "retry_exception_types")


def check_common_spec(spec, where: tuple) -> None:
    """Rules every TaskSpec follows, whether a node or an actor reads it.

    Written for speed (every task and actor call passes here): each field is
    read once, and containers are only walked when they are not empty.
    """
    task_id = spec.task_id
    if len(task_id) != ids.TASK_ID_LEN:
        fail(where, "task_id", task_id, f"a {ids.TASK_ID_LEN}-byte task id")
    job_id = spec.job_id
    if job_id and len(job_id) != JOB_ID_LEN:
        fail(where, "job_id", job_id, f"empty or a {JOB_ID_LEN}-byte job id")
    check_object_ids(spec.arg_ref_ids, where, "arg_ref_ids")
    check_object_ids(spec.contained_ids, where, "contained_ids")
    parent = spec.parent_task_id
    if parent and len(parent) != ids.TASK_ID_LEN:
        fail(where, "parent_task_id", parent, f"empty or a {ids.TASK_ID_LEN}-byte task id")
    if spec.retry_exception_types:
        check_retry_types(spec, where)
    if spec.dynamic_returns and spec.num_returns != 1:
        fail(where, "num_returns", spec.num_returns, "1 with dynamic_returns")
