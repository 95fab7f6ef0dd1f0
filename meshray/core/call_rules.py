"""What a well-formed call batch to an actor is (sent on a call link).

Pure checks, run by rpc/strict.py on each decoded batch before any call in
it is dispatched. Beyond the shared rules (rpc/rules.py): the call is for
this actor, names one of its methods, declares a return count in range (-1:
a generator streaming its items back), and
names an argument file (if any) inside the node store's args/ directory.
Its argument bytes are checked when the call runs (ActorHost.load_args): an
image that does not parse, bytes that are no pickle, or a pickle of anything
but an (args, kwargs) pair end the call's stream with INVALID_ARGUMENT.
"""
from __future__ import annotations

from meshray.common import ids
from meshray.rpc.rules import (
    MAX_NUM_RETURNS,
    WORKER_ID_LEN,
    check_common_spec,
    check_id,
    check_ids,
    fail,
)

__all__ = ["check_actor_call", "check_actor_call_batch"]


def check_actor_call(spec, where: tuple, actor_id: bytes, methods) -> None:
    """A method call streamed to the actor `actor_id` whose methods are `methods`.

    Only what the actor reads is checked (it ignores placement fields). The
    argument bytes are checked where they are read anyway, when the call runs
    (ActorHost.load_args): reading a bytes field copies it, and an image can
    be megabytes.
    """
    check_common_spec(spec, where)
    if spec.actor_id != actor_id:
        fail(where, "actor_id", spec.actor_id, f"this actor's id {actor_id.hex()}")
    if spec.method_name not in methods:
        fail(where, "method_name", spec.method_name, "a method of this actor")
    num_returns = spec.num_returns
    if not -1 <= num_returns <= MAX_NUM_RETURNS:
        fail(where, "num_returns", num_returns, f"-1 (streaming) or 0..{MAX_NUM_RETURNS}")
    if spec.actor_creation:
        fail(where, "actor_creation", True, "false in an actor call")
    name = spec.args_file
    if name:
        if not spec.args_image:
            fail(where, "args_file", name, "an args_file only with args_image=true")
        if "/" in name or name.startswith(".") or "\0" in name:
            fail(where, "args_file", name, "a file name in the node store's args/")


def check_actor_call_batch(batch, actor_id: bytes, methods) -> None:
    """An ActorCallBatch on a call link to the actor `actor_id`."""
    check_id(batch.caller_id, WORKER_ID_LEN, (), "caller_id", "worker id", optional=True)
    for index, spec in enumerate(batch.calls):
        check_actor_call(spec, ("calls", index), actor_id, methods)
    if batch.cancel_task_ids:
        check_ids(batch.cancel_task_ids, ids.TASK_ID_LEN, (), "cancel_task_ids", "task id")
