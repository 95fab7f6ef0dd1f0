"""Exception types with Ray's names and hierarchy.

Programs written for Ray catch these by name (`except
ray.exceptions.RayActorError`), so the class names, base classes and the
public attributes match Ray 2.x; constructors accept Ray's positional
arguments and add keyword-only ids where meshray knows more (task, actor,
node, worker). Messages always name the ids involved and, for task errors,
the remote traceback including its cause chain.

Every error pickles: errors cross process boundaries inside task results.
`RayError.__reduce__` rebuilds instances without calling `__init__`, so
subclasses with any constructor signature round-trip with their attributes.

Beyond Ray: `ActorAlreadyExistsError` (Ray raises a bare ValueError for a
taken actor name; ours subclasses ValueError so Ray-style `except
ValueError` still works) and `PlacementGroupSchedulingError`.
"""
from __future__ import annotations

from typing import Any, Optional

from meshray.exceptions._base import (
    CrossLanguageError,
    RayError,
    TaskCancelledError,
    _hex,
    _ids,
)
from meshray.exceptions._task_error import RayTaskError


__all__ = [
    "RayError", "CrossLanguageError", "TaskCancelledError", "RayTaskError", "LocalRayletDiedError",
    "WorkerCrashedError", "RayActorError", "ActorDiedError", "ActorUnavailableError",
    "ActorAlreadyExistsError", "RaySystemError", "UserCodeException", "ObjectStoreFullError",
    "OutOfDiskError", "OutOfMemoryError", "NodeDiedError", "ObjectLostError",
    "ObjectFetchTimedOutError", "RpcError", "ReferenceCountingAssertionError", "ObjectFreedError",
    "OwnerDiedError", "ObjectReconstructionFailedError",
    "ObjectReconstructionFailedMaxAttemptsExceededError",
    "ObjectReconstructionFailedLineageEvictedError", "GetTimeoutError", "PlasmaObjectNotAvailable",
    "AsyncioActorExit", "RuntimeEnvSetupError", "TaskPlacementGroupRemoved",
    "ActorPlacementGroupRemoved", "PendingCallsLimitExceeded", "TaskUnschedulableError",
    "ActorUnschedulableError", "PlacementGroupSchedulingError", "ObjectRefStreamEndOfStreamError",
    "OufOfBandObjectRefSerializationException", "RayChannelError", "RayChannelTimeoutError",
    "RayCgraphCapacityExceeded", "StreamingGeneratorReplayInconsistentError",
    "RayDirectTransportError", "ActorHandleNotFoundError", "UnserializableException",
    "AuthenticationError",
    "RAY_EXCEPTION_TYPES",
]

# Defined in the private modules, named by this public one (reprs, pickles).
for _cls in (RayError, CrossLanguageError, TaskCancelledError, RayTaskError):
    _cls.__module__ = __name__
del _cls


class LocalRayletDiedError(RayError):
    """The task's local node daemon died."""

    def __init__(self, *args: Any, node_id: Any = None):
        self.node_id = _hex(node_id)
        super().__init__(*args)

    def __str__(self) -> str:
        where = f" (node {self.node_id})" if self.node_id else ""
        return f"The task's local node daemon{where} died. Check its log for more information."


class WorkerCrashedError(RayError):
    """The worker process died unexpectedly while running the task."""

    def __init__(self, error_message: Optional[str] = None, *, task_id: Any = None,
                 worker_id: Any = None, node_id: Any = None):
        self.error_message = error_message
        self.task_id, self.worker_id, self.node_id = _hex(task_id), _hex(worker_id), _hex(node_id)
        super().__init__(*(() if error_message is None else (error_message,)))

    def __str__(self) -> str:
        ids = _ids(task_id=self.task_id, worker_id=self.worker_id, node_id=self.node_id)
        extra = f" {self.error_message}" if self.error_message else ""
        return (f"The worker died unexpectedly while executing this task{ids}.{extra} "
                "Check the worker's log on that node for more information.")


class RayActorError(RayError):
    """The actor could not finish the task: it died, or is unreachable for now.

    Subclasses: ActorDiedError (permanent) and ActorUnavailableError
    (transient; the call may or may not have run).
    """

    BASE_ERROR_MSG = "The actor experienced an error before finishing this task."

    def __init__(
        self,
        actor_id: Any = None,
        error_msg: str = BASE_ERROR_MSG,
        actor_init_failed: bool = False,
        preempted: bool = False,
    ):
        self.actor_id = _hex(actor_id)
        self.error_msg = error_msg
        self._actor_init_failed = actor_init_failed
        self._preempted = preempted
        super().__init__(self.actor_id, error_msg)

    @property
    def actor_init_failed(self) -> bool:
        return self._actor_init_failed

    @property
    def preempted(self) -> bool:
        return self._preempted

    def __str__(self) -> str:
        return self.error_msg

    @staticmethod
    def from_task_error(task_error: RayTaskError) -> "ActorDiedError":
        return ActorDiedError(task_error)


class ActorDiedError(RayActorError):
    """The actor is dead: its process or node died, it was killed, or __init__ raised.

    `cause` is the RayTaskError from a failed `__init__`, or None for system
    failures, whose details come as keywords.
    """

    BASE_ERROR_MSG = "The actor died unexpectedly before finishing this task."

    def __init__(
        self, cause: Optional[RayTaskError] = None, *, actor_id: Any = None,
        class_name: Optional[str] = None, name: Optional[str] = None,
        namespace: Optional[str] = None, pid: Optional[int] = None, ip: Optional[str] = None,
        node_id: Any = None, error_message: Optional[str] = None, never_started: bool = False,
        preempted: bool = False,
    ):
        init_failed = False
        if isinstance(cause, RayTaskError):
            init_failed = True
            actor_id = actor_id if actor_id is not None else cause.actor_id
            msg = f"The actor died because of an error raised in its creation task, {cause}"
        else:
            lines = [self.BASE_ERROR_MSG]
            for label, value in (("class_name", class_name), ("actor_id", _hex(actor_id)),
                                 ("pid", pid), ("name", name), ("namespace", namespace),
                                 ("ip", ip), ("node_id", _hex(node_id))):
                if value:
                    lines.append(f"\t{label}: {value}")
            if error_message:
                lines.append(error_message)
            if never_started:
                lines.append("The actor never ran - it was cancelled before it started running.")
            msg = "\n".join(lines)
        self.cause, self.class_name, self.name, self.namespace = cause, class_name, name, namespace
        self.pid, self.ip, self.node_id = pid, ip, _hex(node_id)
        super().__init__(actor_id, msg, init_failed, preempted)

    @staticmethod
    def from_task_error(task_error: RayTaskError) -> "ActorDiedError":
        return ActorDiedError(task_error)


class ActorUnavailableError(RayActorError):
    """The actor can't be reached right now (e.g. restarting); it may come back.

    `delivered` (a meshray extension) is False when the call provably never
    reached the actor, so it did not run; True when it was sent and its
    outcome is unknown.
    """

    def __init__(self, error_message: str, actor_id: Any = None, *, delivered: bool = True):
        aid = _hex(actor_id)
        outcome = ("The task may or may not have been executed on the actor." if delivered else
                   "The task was not executed: it was never delivered to the actor.")
        msg = f"The actor {aid} is unavailable: {error_message}. {outcome}"
        super().__init__(aid, msg, False, False)
        self.error_message = error_message
        self.delivered = delivered


class ActorAlreadyExistsError(RayError, ValueError):
    """A named actor with this name already exists in the namespace (meshray extension)."""

    def __init__(self, name: str, namespace: Optional[str] = None, actor_id: Any = None):
        self.name = name
        self.namespace = namespace
        self.actor_id = _hex(actor_id)
        super().__init__(name, namespace)

    def __str__(self) -> str:
        return (f"The name {self.name} (namespace={self.namespace}) is already taken"
                f"{_ids(actor_id=self.actor_id)}. Use a different name, or get_if_exists=True "
                "to reuse the existing actor.")


class RaySystemError(RayError):
    """meshray itself failed (daemon, store or transport), not user code."""

    def __init__(self, client_exc: Any, traceback_str: Optional[str] = None):
        self.client_exc = client_exc
        self.traceback_str = traceback_str
        super().__init__(client_exc, traceback_str)

    def __str__(self) -> str:
        msg = f"System error: {self.client_exc}"
        if self.traceback_str:
            msg += f"\ntraceback: {self.traceback_str}"
        return msg


class UserCodeException(RayError):
    """Wraps an exception from user code; retry_exceptions still sees the cause."""


class ObjectStoreFullError(RayError):
    """The object could not be stored: the store is full of in-scope objects."""

    def __str__(self) -> str:
        return super().__str__() + (
            "\nThe local object store is full of objects that are still in scope and cannot "
            "be evicted or spilled. Free references you no longer need, or give the store "
            "more memory."
        )


class OutOfDiskError(RayError):
    """Both the object store and the spill disk are full."""

    def __str__(self) -> str:
        return super().__str__() + (
            "\nThe object cannot be created because the local object store is full and the "
            "spill directory's disk is over its usage threshold. Check disk usage (df) on "
            "this node."
        )


class OutOfMemoryError(RayError):
    """The node ran low on memory and killed the task's worker to recover.

    Beyond Ray: the figures the node decided on are attributes too (bytes;
    None when unknown), so a program can log or act on them.
    """

    def __init__(self, message: str, *, task_id: Any = None, node_id: Any = None,
                 worker_id: Any = None, memory_used: Optional[int] = None,
                 memory_limit: Optional[int] = None, threshold: Optional[float] = None,
                 rss: Optional[int] = None):
        self.message, self.task_id, self.node_id = message, _hex(task_id), _hex(node_id)
        self.worker_id = _hex(worker_id)
        self.memory_used, self.memory_limit, self.threshold = memory_used, memory_limit, threshold
        self.rss = rss
        super().__init__(message)

    def __str__(self) -> str:
        return self.message


class NodeDiedError(RayError):
    """The node is dead or unreachable (its etcd lease expired)."""

    def __init__(self, message: str, *, node_id: Any = None):
        self.message, self.node_id = message, _hex(node_id)
        super().__init__(message)

    def __str__(self) -> str:
        return self.message


class ObjectLostError(RayError):
    """Every copy of the object is gone (node failure or system error).

    Subclasses only change the explanation (`_detail`); all carry the object
    id, the owner's address and the creation call site.
    """

    _detail = (
        "All copies of {id} have been lost due to node failure. Check the node daemons' "
        "logs for more information about the failure."
    )

    def __init__(self, object_ref_hex: Any, owner_address: Any = None, call_site: Optional[str] = None):
        self.object_ref_hex = _hex(object_ref_hex)
        self.owner_address = owner_address
        self.call_site = call_site or ""
        super().__init__(self.object_ref_hex, owner_address, self.call_site)

    def _base_str(self) -> str:
        msg = f"Failed to retrieve object {self.object_ref_hex}."
        if self.owner_address:
            msg += f" Its owner is {self.owner_address}."
        if self.call_site:
            msg += f" The ObjectRef was created at: {self.call_site}"
        return msg

    def __str__(self) -> str:
        owner = f" ({self.owner_address})" if self.owner_address else ""
        return self._base_str() + "\n\n" + self._detail.format(id=self.object_ref_hex, owner=owner)


class ObjectFetchTimedOutError(ObjectLostError):
    """No location of the object answered in time."""

    _detail = (
        "Fetch for object {id} timed out because no locations were found for the object. "
        "This may indicate a system-level bug."
    )


class RpcError(RayError):
    """The underlying gRPC call failed."""

    def __init__(self, message: str, rpc_code: Any = None):
        self.message = message
        self.rpc_code = rpc_code
        super().__init__(message, rpc_code)

    def __str__(self) -> str:
        return self.message


class ReferenceCountingAssertionError(ObjectLostError, AssertionError):
    """The object was deleted while a reference still existed (a refcount bug)."""

    _detail = (
        "The object has already been deleted by the reference counting protocol. "
        "This should not happen."
    )


class ObjectFreedError(ObjectLostError):
    """The application freed the object explicitly."""

    _detail = (
        "The object was manually freed using the internal `free` call. Call `free` only "
        "once the object is no longer needed."
    )


class OwnerDiedError(ObjectLostError):
    """The process that owned the object (created it) exited."""

    _detail = (
        "The object's owner{owner} has exited. This is the Python worker or driver that "
        "first created the ObjectRef via `.remote()` or `put()`. Check that process's log "
        "for more information."
    )


class ObjectReconstructionFailedError(ObjectLostError):
    """The object is lost and can't be rebuilt from lineage."""

    _detail = (
        "The object cannot be reconstructed because it was created by an actor, a put() "
        "call, or its ObjectRef was created by a different worker."
    )


class ObjectReconstructionFailedMaxAttemptsExceededError(ObjectLostError):
    """Rebuilding the object would exceed its task's retry budget."""

    _detail = (
        "The object cannot be reconstructed because the maximum number of task retries "
        "has been exceeded. Set `@remote(max_retries=<n>)` (default 3) to allow more."
    )


class ObjectReconstructionFailedLineageEvictedError(ObjectLostError):
    """The lineage needed to rebuild the object was evicted to save memory."""

    _detail = (
        "The object cannot be reconstructed because its lineage has been evicted to "
        "reduce memory pressure."
    )


class GetTimeoutError(RayError, TimeoutError):
    """`get` (or `wait`-based retrieval) ran past its timeout."""


class PlasmaObjectNotAvailable(RayError):
    """The object was not available within the given timeout."""


class AsyncioActorExit(RayError):
    """An asyncio actor is exiting on purpose (exit_actor())."""


class RuntimeEnvSetupError(RayError):
    """The task's or actor's runtime environment could not be set up."""

    def __init__(self, error_message: Optional[str] = None):
        self.error_message = error_message
        super().__init__(*(() if error_message is None else (error_message,)))

    def __str__(self) -> str:
        msgs = ["Failed to set up runtime environment."]
        if self.error_message:
            msgs.append(self.error_message)
        return "\n".join(msgs)


class TaskPlacementGroupRemoved(RayError):
    """The task's placement group was removed."""

    def __str__(self) -> str:
        return "The placement group corresponding to this task has been removed."


class ActorPlacementGroupRemoved(RayError):
    """The actor's placement group was removed."""

    def __str__(self) -> str:
        return "The placement group corresponding to this Actor has been removed."


class PendingCallsLimitExceeded(RayError):
    """Too many calls pending on an actor handle (`max_pending_calls`)."""


class TaskUnschedulableError(RayError):
    """The task can never be scheduled (e.g. hard affinity to a dead node)."""

    def __init__(self, error_message: str, *, task_id: Any = None):
        self.error_message = error_message
        self.task_id = _hex(task_id)
        super().__init__(error_message)

    def __str__(self) -> str:
        who = f" (task {self.task_id})" if self.task_id else ""
        return f"The task{who} is not schedulable: {self.error_message}"


class ActorUnschedulableError(RayError):
    """The actor can never be scheduled (e.g. hard affinity to a dead node)."""

    def __init__(self, error_message: str, *, actor_id: Any = None):
        self.error_message = error_message
        self.actor_id = _hex(actor_id)
        super().__init__(error_message)

    def __str__(self) -> str:
        who = f" (actor {self.actor_id})" if self.actor_id else ""
        return f"The actor{who} is not schedulable: {self.error_message}"


class PlacementGroupSchedulingError(RayError):
    """A placement group could not be reserved (meshray extension)."""

    def __init__(self, message: str, *, placement_group_id: Any = None):
        self.message = message
        self.placement_group_id = _hex(placement_group_id)
        super().__init__(message)

    def __str__(self) -> str:
        who = f"Placement group {self.placement_group_id}: " if self.placement_group_id else ""
        return f"{who}{self.message}"


class ObjectRefStreamEndOfStreamError(RayError):
    """A streaming generator has no more ObjectRefs to yield."""


class OufOfBandObjectRefSerializationException(RayError):
    """An ObjectRef was serialized out of band (Ray's class name, typo included)."""


class RayChannelError(RaySystemError):
    """System error in a compiled-graph channel (parity with Ray)."""


class RayChannelTimeoutError(RayChannelError, TimeoutError):
    """A compiled-graph channel operation timed out (parity with Ray)."""


class RayCgraphCapacityExceeded(RaySystemError):
    """A compiled graph's buffers are full (parity with Ray; meshray has no compiled graphs)."""


class StreamingGeneratorReplayInconsistentError(RaySystemError):
    """A streaming generator's re-run yielded a different number of items than its
    first run (kept for Ray API parity: meshray re-runs generators from the start)."""


class RayDirectTransportError(RaySystemError):
    """A direct tensor transport failed (kept for Ray API parity: meshray has none)."""


class ActorHandleNotFoundError(RayError, ValueError):
    """No actor with the asked name or id is known (a ValueError too, as get_actor's)."""


class UnserializableException(RayError):
    """An error could not travel (pickled or unpickled): its text and traceback stand in."""

    def __init__(self, original_stack_trace: str):
        self.original_stack_trace = original_stack_trace
        super().__init__(original_stack_trace)

    def __str__(self) -> str:
        return ("The exception raised could not be rebuilt here; its text and traceback as "
                f"captured where it was raised:\n{self.original_stack_trace}")


class AuthenticationError(RayError, ConnectionError):
    """A peer refused this process's credentials (a missing or wrong cluster token).

    Also a ConnectionError, which meshray raised for this before."""

    def __init__(self, message: str):
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:
        return self.message


RAY_EXCEPTION_TYPES = [
    PlasmaObjectNotAvailable, RayError, RayTaskError, WorkerCrashedError, RayActorError,
    ObjectStoreFullError, ObjectLostError, ObjectFetchTimedOutError,
    ReferenceCountingAssertionError, ObjectReconstructionFailedError,
    ObjectReconstructionFailedMaxAttemptsExceededError,
    ObjectReconstructionFailedLineageEvictedError, OwnerDiedError, GetTimeoutError,
    AsyncioActorExit, RuntimeEnvSetupError, TaskPlacementGroupRemoved, ActorPlacementGroupRemoved,
    PendingCallsLimitExceeded, LocalRayletDiedError, TaskUnschedulableError, ActorDiedError,
    ActorUnschedulableError, ActorUnavailableError, RayChannelError, RayChannelTimeoutError,
    RayCgraphCapacityExceeded, StreamingGeneratorReplayInconsistentError,
    RayDirectTransportError, ActorHandleNotFoundError, UnserializableException,
    AuthenticationError,
]
