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
    FUNCTION_ID_LEN,
    MAX_NUM_RETURNS,
    WORKER_ID_LEN,
    check_common_spec,
    check_id,
    check_ids,
    check_pickle,
    fail,
)

__all__ = ["check_actor_call", "check_actor_call_batch", "check_lease_call",
           "check_lease_call_batch", "LEASE_ID_LEN"]

LEASE_ID_LEN = 16


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


def check_lease_call(spec, where: tuple) -> None:
    """A normal task pushed to a leased worker by the lease's holder.

    The holder pushes only tasks the node would run unchanged on a worker of
    this kind (core/task_leases.py, `pushable`): no actor, no stream, no
    argument file; anything else is malformed.
    """
    check_common_spec(spec, where)
    if spec.actor_id or spec.actor_creation or spec.method_name:
        fail(where, "actor_id", spec.actor_id, "empty in a task pushed on a lease")
    if len(spec.function_id) != FUNCTION_ID_LEN:
        fail(where, "function_id", spec.function_id, f"a {FUNCTION_ID_LEN}-byte function id")
    num_returns = spec.num_returns
    if not 0 <= num_returns <= MAX_NUM_RETURNS:
        fail(where, "num_returns", num_returns, f"0..{MAX_NUM_RETURNS} (no streams on a lease)")
    if spec.args_file or spec.args_image:
        fail(where, "args_file", spec.args_file, "no argument file or image on a lease")


def check_lease_call_batch(batch) -> None:
    """An ActorCallBatch on a link to a leased worker."""
    check_id(batch.caller_id, WORKER_ID_LEN, (), "caller_id", "worker id", optional=True)
    check_id(batch.lease_id, LEASE_ID_LEN, (), "lease_id", "lease id")
    for index, function in enumerate(batch.functions):
        where = ("functions", index)
        check_id(function.function_id, FUNCTION_ID_LEN, where, "function_id", "function id")
        check_pickle(function.pickled, where, "pickled", optional=False)
    for index, spec in enumerate(batch.calls):
        check_lease_call(spec, ("calls", index))
    if batch.cancel_task_ids:
        check_ids(batch.cancel_task_ids, ids.TASK_ID_LEN, (), "cancel_task_ids", "task id")
