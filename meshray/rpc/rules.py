"""Rules every well-formed meshray message follows, whichever server reads it.

The node's request checks (node/request_rules.py) and the actor's call checks
(core/call_rules.py) are built from these: id lengths (meshray.core.ids),
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

from meshray.core import ids
from meshray.rpc.strict import Malformed

__all__ = [
    "FUNCTION_ID_LEN", "JOB_ID_LEN", "MAX_NUM_RETURNS", "NODE_ID_LEN", "WORKER_ID_LEN",
    "check_common_spec", "check_id", "check_ids", "check_int_at_least", "check_json",
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


def fail(path: str, value, expected: str):
    raise Malformed(f"{path}={_show(value)}: expected {expected}")


def check_id(value: bytes, length: int, path: str, what: str, optional: bool = False) -> None:
    if len(value) != length and not (optional and not value):
        fail(path, value, f"{'empty or ' if optional else ''}a {length}-byte {what}")


def check_ids(values, length: int, path: str, what: str) -> None:
    for index, value in enumerate(values):
        if len(value) != length:
            fail(f"{path}[{index}]", value, f"a {length}-byte {what}")


def check_object_ids(values, path: str) -> None:
    check_ids(values, ids.OBJECT_ID_LEN, path, "object id")


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


def check_pickle(blob, path: str, optional: bool = True) -> None:
    if not blob and optional:
        return
    problem = pickle_problem(blob)
    if problem is not None:
        fail(path, blob, problem)


def check_json(text, path: str, *, want_object: bool = True):
    """The decoded JSON `text` (an object unless want_object=False)."""
    try:
        value = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        fail(path, text, f"JSON ({exc})")
    if want_object and not isinstance(value, dict):
        fail(path, text, "a JSON object")
    return value


def check_int_at_least(value, minimum: int, path: str) -> None:
    if value < minimum:
        fail(path, value, f"an integer >= {minimum}")


def check_node_hex(text: str, path: str, optional: bool = True) -> None:
    if (text or not optional) and not _HEX_NODE.fullmatch(text):
        fail(path, text, f"{'empty or ' if optional else ''}a node id "
             f"({2 * NODE_ID_LEN} lower-case hex digits)")


def _address_list(text: str, path: str) -> None:
    """Comma-separated "host:port" / "unix:/path" addresses (an actor's)."""
    from meshray.rpc.factory import split_host_port
    for part in text.split(","):
        if part.startswith("unix:") and len(part) > 5:
            continue
        try:
            split_host_port(part)
        except ValueError:
            fail(path, text, "comma-separated HOST:PORT or unix:PATH addresses")


# ------------------------------------------------------------------ values
def check_object_value(value, path: str) -> None:
    check_id(value.object_id, ids.OBJECT_ID_LEN, f"{path}.object_id", "object id")
    if value.in_store:
        if value.inline_data:
            fail(f"{path}.inline_data", value.inline_data,
                 "no inline bytes for a value in the store (in_store=true)")
        check_node_hex(value.location, f"{path}.location")
    else:
        if value.location:
            fail(f"{path}.location", value.location, "no location for an inline value")
        check_pickle(value.inline_data, f"{path}.inline_data", optional=not value.is_error)
    check_object_ids(value.contained_ids, f"{path}.contained_ids")


def check_task_result(result, path: str) -> None:
    check_id(result.task_id, ids.TASK_ID_LEN, f"{path}.task_id", "task id")
    for index, value in enumerate(result.returns):
        check_object_value(value, f"{path}.returns[{index}]")
    if result.stream_item_id:
        check_id(result.stream_item_id, ids.OBJECT_ID_LEN, f"{path}.stream_item_id",
                 "object id")
        if len(result.returns) != 1:
            fail(f"{path}.returns", f"{len(result.returns)} values",
                 "exactly one value with a stream_item_id")
    if result.actor_address:
        _address_list(result.actor_address, f"{path}.actor_address")


# ------------------------------------------------------------------ task specs
def _env_vars(env_vars, path: str) -> None:
    for key, value in env_vars.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            fail(f"{path}[{key!r}]", value,
                 "environment variables named without '=' or NUL, valued without NUL")


def check_runtime_env(text: str, path: str) -> None:
    env = check_json(text, path)
    packages = env.get("_packages", {})
    if not isinstance(packages, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in packages.items()):
        fail(f"{path}._packages", packages, "a map of package URI to object id (hex)")


def check_common_spec(spec, path: str) -> None:
    """Rules every TaskSpec follows, whether a node or an actor reads it."""
    check_id(spec.task_id, ids.TASK_ID_LEN, f"{path}.task_id", "task id")
    check_id(spec.job_id, JOB_ID_LEN, f"{path}.job_id", "job id", optional=True)
    check_object_ids(spec.arg_ref_ids, f"{path}.arg_ref_ids")
    check_object_ids(spec.contained_ids, f"{path}.contained_ids")
    check_id(spec.owner_id, WORKER_ID_LEN, f"{path}.owner_id", "worker id", optional=True)
    check_id(spec.parent_task_id, ids.TASK_ID_LEN, f"{path}.parent_task_id", "task id",
             optional=True)
    check_int_at_least(spec.attempt, 0, f"{path}.attempt")
    check_int_at_least(spec.max_retries, -1, f"{path}.max_retries")
    if spec.retry_exception_types:
        if not spec.retry_exceptions:
            fail(f"{path}.retry_exception_types", spec.retry_exception_types,
                 "none without retry_exceptions=true")
        check_pickle(spec.retry_exception_types, f"{path}.retry_exception_types")
    if spec.env_vars:
        _env_vars(spec.env_vars, f"{path}.env_vars")
    if spec.runtime_env_json:
        check_runtime_env(spec.runtime_env_json, f"{path}.runtime_env_json")
