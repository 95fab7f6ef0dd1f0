"""What a well-formed call batch to an actor is (ActorService.Call).

Pure checks, run by rpc/strict.py on each decoded batch before any call in
it is dispatched. Beyond the shared rules (rpc/rules.py): the call is for
this actor, names one of its methods, and declares a return count in range;
its arguments are an object image that parses (args_image), a file name in
the node store's args/ directory (args_file), or a framed pickle. Whether
the pickle holds an (args, kwargs) pair is only known once it is loaded,
when the call runs (ActorHost.load_args).
"""
from __future__ import annotations

from meshray.rpc.rules import (
    MAX_NUM_RETURNS,
    WORKER_ID_LEN,
    check_common_spec,
    check_id,
    check_pickle,
    fail,
)
from meshray.rpc.strict import Malformed

__all__ = ["check_actor_call", "check_actor_call_batch"]


def check_actor_call(spec, path: str, actor_id: bytes, methods) -> None:
    """A method call streamed to the actor `actor_id` whose methods are `methods`."""
    check_common_spec(spec, path)
    if spec.actor_id != actor_id:
        fail(f"{path}.actor_id", spec.actor_id, f"this actor's id {actor_id.hex()}")
    if spec.actor_creation:
        fail(f"{path}.actor_creation", True, "false in an actor call")
    if spec.method_name not in methods:
        fail(f"{path}.method_name", spec.method_name, "a method of this actor")
    if not 0 <= spec.num_returns <= MAX_NUM_RETURNS:
        fail(f"{path}.num_returns", spec.num_returns, f"0..{MAX_NUM_RETURNS}")
    if spec.args_file:
        if not spec.args_image or spec.args_blob:
            fail(f"{path}.args_file", spec.args_file,
                 "an args_file only with args_image=true and no args_blob")
        if "/" in spec.args_file or spec.args_file.startswith(".") or "\0" in spec.args_file:
            fail(f"{path}.args_file", spec.args_file, "a file name in the node store's args/")
    elif spec.args_image:
        from meshray.object_store import layout
        try:
            inband, _buffers = layout.unpack_object(spec.args_blob, where=f"{path}.args_blob")
        except ValueError as exc:
            raise Malformed(str(exc)) from None
        check_pickle(inband, f"{path}.args_blob (in-band part of the image)", optional=False)
    else:
        check_pickle(spec.args_blob, f"{path}.args_blob")


def check_actor_call_batch(batch, actor_id: bytes, methods) -> None:
    """An ActorCallBatch on ActorService.Call of the actor `actor_id`."""
    check_id(batch.caller_id, WORKER_ID_LEN, "caller_id", "worker id", optional=True)
    for index, spec in enumerate(batch.calls):
        check_actor_call(spec, f"calls[{index}]", actor_id, methods)
