from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ObjectValue(_message.Message):
    __slots__ = ("object_id", "inline_data", "in_store", "size", "is_error", "contained_ids", "location")
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    INLINE_DATA_FIELD_NUMBER: _ClassVar[int]
    IN_STORE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    IS_ERROR_FIELD_NUMBER: _ClassVar[int]
    CONTAINED_IDS_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    object_id: bytes
    inline_data: bytes
    in_store: bool
    size: int
    is_error: bool
    contained_ids: _containers.RepeatedScalarFieldContainer[bytes]
    location: str
    def __init__(self, object_id: _Optional[bytes] = ..., inline_data: _Optional[bytes] = ..., in_store: _Optional[bool] = ..., size: _Optional[int] = ..., is_error: _Optional[bool] = ..., contained_ids: _Optional[_Iterable[bytes]] = ..., location: _Optional[str] = ...) -> None: ...

class TaskSpec(_message.Message):
    __slots__ = ("task_id", "job_id", "function_id", "name", "args_blob", "arg_ref_ids", "contained_ids", "num_returns", "resources", "max_retries", "retry_exceptions", "retry_exception_types", "scheduling_strategy", "strategy_blob", "env_vars", "owner_id", "parent_task_id", "attempt", "runtime_env_json", "actor_id", "actor_creation", "method_name", "sequence", "concurrency_group", "actor_options", "held_resources", "args_image", "args_file", "namespace", "dynamic_returns")
    class ResourcesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class EnvVarsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class HeldResourcesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARGS_BLOB_FIELD_NUMBER: _ClassVar[int]
    ARG_REF_IDS_FIELD_NUMBER: _ClassVar[int]
    CONTAINED_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_RETURNS_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    MAX_RETRIES_FIELD_NUMBER: _ClassVar[int]
    RETRY_EXCEPTIONS_FIELD_NUMBER: _ClassVar[int]
    RETRY_EXCEPTION_TYPES_FIELD_NUMBER: _ClassVar[int]
    SCHEDULING_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_BLOB_FIELD_NUMBER: _ClassVar[int]
    ENV_VARS_FIELD_NUMBER: _ClassVar[int]
    OWNER_ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_ENV_JSON_FIELD_NUMBER: _ClassVar[int]
    ACTOR_ID_FIELD_NUMBER: _ClassVar[int]
    ACTOR_CREATION_FIELD_NUMBER: _ClassVar[int]
    METHOD_NAME_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_GROUP_FIELD_NUMBER: _ClassVar[int]
    ACTOR_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    HELD_RESOURCES_FIELD_NUMBER: _ClassVar[int]
    ARGS_IMAGE_FIELD_NUMBER: _ClassVar[int]
    ARGS_FILE_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    DYNAMIC_RETURNS_FIELD_NUMBER: _ClassVar[int]
    task_id: bytes
    job_id: bytes
    function_id: bytes
    name: str
    args_blob: bytes
    arg_ref_ids: _containers.RepeatedScalarFieldContainer[bytes]
    contained_ids: _containers.RepeatedScalarFieldContainer[bytes]
    num_returns: int
    resources: _containers.ScalarMap[str, float]
    max_retries: int
    retry_exceptions: bool
    retry_exception_types: bytes
    scheduling_strategy: str
    strategy_blob: bytes
    env_vars: _containers.ScalarMap[str, str]
    owner_id: bytes
    parent_task_id: bytes
    attempt: int
    runtime_env_json: str
    actor_id: bytes
    actor_creation: bool
    method_name: str
    sequence: int
    concurrency_group: str
    actor_options: bytes
    held_resources: _containers.ScalarMap[str, float]
    args_image: bool
    args_file: str
    namespace: str
    dynamic_returns: bool
    def __init__(self, task_id: _Optional[bytes] = ..., job_id: _Optional[bytes] = ..., function_id: _Optional[bytes] = ..., name: _Optional[str] = ..., args_blob: _Optional[bytes] = ..., arg_ref_ids: _Optional[_Iterable[bytes]] = ..., contained_ids: _Optional[_Iterable[bytes]] = ..., num_returns: _Optional[int] = ..., resources: _Optional[_Mapping[str, float]] = ..., max_retries: _Optional[int] = ..., retry_exceptions: _Optional[bool] = ..., retry_exception_types: _Optional[bytes] = ..., scheduling_strategy: _Optional[str] = ..., strategy_blob: _Optional[bytes] = ..., env_vars: _Optional[_Mapping[str, str]] = ..., owner_id: _Optional[bytes] = ..., parent_task_id: _Optional[bytes] = ..., attempt: _Optional[int] = ..., runtime_env_json: _Optional[str] = ..., actor_id: _Optional[bytes] = ..., actor_creation: _Optional[bool] = ..., method_name: _Optional[str] = ..., sequence: _Optional[int] = ..., concurrency_group: _Optional[str] = ..., actor_options: _Optional[bytes] = ..., held_resources: _Optional[_Mapping[str, float]] = ..., args_image: _Optional[bool] = ..., args_file: _Optional[str] = ..., namespace: _Optional[str] = ..., dynamic_returns: _Optional[bool] = ...) -> None: ...

class ActorCallBatch(_message.Message):
    __slots__ = ("calls", "caller_id", "cancel_task_ids", "lease_id", "functions")
    CALLS_FIELD_NUMBER: _ClassVar[int]
    CALLER_ID_FIELD_NUMBER: _ClassVar[int]
    CANCEL_TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    calls: _containers.RepeatedCompositeFieldContainer[TaskSpec]
    caller_id: bytes
    cancel_task_ids: _containers.RepeatedScalarFieldContainer[bytes]
    lease_id: bytes
    functions: _containers.RepeatedCompositeFieldContainer[RegisterFunction]
    def __init__(self, calls: _Optional[_Iterable[_Union[TaskSpec, _Mapping]]] = ..., caller_id: _Optional[bytes] = ..., cancel_task_ids: _Optional[_Iterable[bytes]] = ..., lease_id: _Optional[bytes] = ..., functions: _Optional[_Iterable[_Union[RegisterFunction, _Mapping]]] = ...) -> None: ...

class ActorReplyBatch(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[TaskResult]
    def __init__(self, results: _Optional[_Iterable[_Union[TaskResult, _Mapping]]] = ...) -> None: ...

class TaskResult(_message.Message):
    __slots__ = ("task_id", "returns", "failed", "retryable_error", "stream_item_id", "stream_end", "stream_index", "actor_address", "actor_error", "args_released")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    RETURNS_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_ERROR_FIELD_NUMBER: _ClassVar[int]
    STREAM_ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    STREAM_END_FIELD_NUMBER: _ClassVar[int]
    STREAM_INDEX_FIELD_NUMBER: _ClassVar[int]
    ACTOR_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ACTOR_ERROR_FIELD_NUMBER: _ClassVar[int]
    ARGS_RELEASED_FIELD_NUMBER: _ClassVar[int]
    task_id: bytes
    returns: _containers.RepeatedCompositeFieldContainer[ObjectValue]
    failed: bool
    retryable_error: bool
    stream_item_id: bytes
    stream_end: bool
    stream_index: int
    actor_address: str
    actor_error: str
    args_released: bool
    def __init__(self, task_id: _Optional[bytes] = ..., returns: _Optional[_Iterable[_Union[ObjectValue, _Mapping]]] = ..., failed: _Optional[bool] = ..., retryable_error: _Optional[bool] = ..., stream_item_id: _Optional[bytes] = ..., stream_end: _Optional[bool] = ..., stream_index: _Optional[int] = ..., actor_address: _Optional[str] = ..., actor_error: _Optional[str] = ..., args_released: _Optional[bool] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("role", "worker_id", "pid", "job_id", "namespace", "log_to_driver", "runtime_env_json", "call_address")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    LOG_TO_DRIVER_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_ENV_JSON_FIELD_NUMBER: _ClassVar[int]
    CALL_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    role: str
    worker_id: bytes
    pid: int
    job_id: bytes
    namespace: str
    log_to_driver: bool
    runtime_env_json: str
    call_address: str
    def __init__(self, role: _Optional[str] = ..., worker_id: _Optional[bytes] = ..., pid: _Optional[int] = ..., job_id: _Optional[bytes] = ..., namespace: _Optional[str] = ..., log_to_driver: _Optional[bool] = ..., runtime_env_json: _Optional[str] = ..., call_address: _Optional[str] = ...) -> None: ...

class RegisterFunction(_message.Message):
    __slots__ = ("function_id", "pickled", "name")
    FUNCTION_ID_FIELD_NUMBER: _ClassVar[int]
    PICKLED_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    function_id: bytes
    pickled: bytes
    name: str
    def __init__(self, function_id: _Optional[bytes] = ..., pickled: _Optional[bytes] = ..., name: _Optional[str] = ...) -> None: ...

class SubmitTask(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: TaskSpec
    def __init__(self, spec: _Optional[_Union[TaskSpec, _Mapping]] = ...) -> None: ...

class PutObject(_message.Message):
    __slots__ = ("value", "handoff")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_FIELD_NUMBER: _ClassVar[int]
    value: ObjectValue
    handoff: bool
    def __init__(self, value: _Optional[_Union[ObjectValue, _Mapping]] = ..., handoff: _Optional[bool] = ...) -> None: ...

class ReserveObject(_message.Message):
    __slots__ = ("request_id", "object_id", "size")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    object_id: bytes
    size: int
    def __init__(self, request_id: _Optional[int] = ..., object_id: _Optional[bytes] = ..., size: _Optional[int] = ...) -> None: ...

class Subscribe(_message.Message):
    __slots__ = ("object_ids",)
    OBJECT_IDS_FIELD_NUMBER: _ClassVar[int]
    object_ids: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, object_ids: _Optional[_Iterable[bytes]] = ...) -> None: ...

class RefUpdate(_message.Message):
    __slots__ = ("add", "remove")
    ADD_FIELD_NUMBER: _ClassVar[int]
    REMOVE_FIELD_NUMBER: _ClassVar[int]
    add: _containers.RepeatedScalarFieldContainer[bytes]
    remove: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, add: _Optional[_Iterable[bytes]] = ..., remove: _Optional[_Iterable[bytes]] = ...) -> None: ...

class CancelTask(_message.Message):
    __slots__ = ("object_id", "force", "recursive")
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    RECURSIVE_FIELD_NUMBER: _ClassVar[int]
    object_id: bytes
    force: bool
    recursive: bool
    def __init__(self, object_id: _Optional[bytes] = ..., force: _Optional[bool] = ..., recursive: _Optional[bool] = ...) -> None: ...

class WorkerBlocked(_message.Message):
    __slots__ = ("blocked",)
    BLOCKED_FIELD_NUMBER: _ClassVar[int]
    blocked: bool
    def __init__(self, blocked: _Optional[bool] = ...) -> None: ...

class ActorExiting(_message.Message):
    __slots__ = ("actor_id", "reason", "restartable")
    ACTOR_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RESTARTABLE_FIELD_NUMBER: _ClassVar[int]
    actor_id: bytes
    reason: str
    restartable: bool
    def __init__(self, actor_id: _Optional[bytes] = ..., reason: _Optional[str] = ..., restartable: _Optional[bool] = ...) -> None: ...

class MetricUpdate(_message.Message):
    __slots__ = ("name", "kind", "description", "tag_keys", "tag_values", "value", "boundaries", "bucket_counts", "sum")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    TAG_KEYS_FIELD_NUMBER: _ClassVar[int]
    TAG_VALUES_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    BOUNDARIES_FIELD_NUMBER: _ClassVar[int]
    BUCKET_COUNTS_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    description: str
    tag_keys: _containers.RepeatedScalarFieldContainer[str]
    tag_values: _containers.RepeatedScalarFieldContainer[str]
    value: float
    boundaries: _containers.RepeatedScalarFieldContainer[float]
    bucket_counts: _containers.RepeatedScalarFieldContainer[int]
    sum: float
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., description: _Optional[str] = ..., tag_keys: _Optional[_Iterable[str]] = ..., tag_values: _Optional[_Iterable[str]] = ..., value: _Optional[float] = ..., boundaries: _Optional[_Iterable[float]] = ..., bucket_counts: _Optional[_Iterable[int]] = ..., sum: _Optional[float] = ...) -> None: ...

class MetricsReport(_message.Message):
    __slots__ = ("updates",)
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    updates: _containers.RepeatedCompositeFieldContainer[MetricUpdate]
    def __init__(self, updates: _Optional[_Iterable[_Union[MetricUpdate, _Mapping]]] = ...) -> None: ...

class Request(_message.Message):
    __slots__ = ("request_id", "method", "payload")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    method: str
    payload: bytes
    def __init__(self, request_id: _Optional[int] = ..., method: _Optional[str] = ..., payload: _Optional[bytes] = ...) -> None: ...

class ClientEvent(_message.Message):
    __slots__ = ("hello", "register_function", "submit", "put", "reserve", "subscribe", "refs", "task_result", "cancel", "blocked", "request", "actor_exiting", "task_events", "metrics", "leased_task")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    REGISTER_FUNCTION_FIELD_NUMBER: _ClassVar[int]
    SUBMIT_FIELD_NUMBER: _ClassVar[int]
    PUT_FIELD_NUMBER: _ClassVar[int]
    RESERVE_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIBE_FIELD_NUMBER: _ClassVar[int]
    REFS_FIELD_NUMBER: _ClassVar[int]
    TASK_RESULT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    BLOCKED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    ACTOR_EXITING_FIELD_NUMBER: _ClassVar[int]
    TASK_EVENTS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    LEASED_TASK_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    register_function: RegisterFunction
    submit: SubmitTask
    put: PutObject
    reserve: ReserveObject
    subscribe: Subscribe
    refs: RefUpdate
    task_result: TaskResult
    cancel: CancelTask
    blocked: WorkerBlocked
    request: Request
    actor_exiting: ActorExiting
    task_events: ActorTaskEvents
    metrics: MetricsReport
    leased_task: LeasedTask
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., register_function: _Optional[_Union[RegisterFunction, _Mapping]] = ..., submit: _Optional[_Union[SubmitTask, _Mapping]] = ..., put: _Optional[_Union[PutObject, _Mapping]] = ..., reserve: _Optional[_Union[ReserveObject, _Mapping]] = ..., subscribe: _Optional[_Union[Subscribe, _Mapping]] = ..., refs: _Optional[_Union[RefUpdate, _Mapping]] = ..., task_result: _Optional[_Union[TaskResult, _Mapping]] = ..., cancel: _Optional[_Union[CancelTask, _Mapping]] = ..., blocked: _Optional[_Union[WorkerBlocked, _Mapping]] = ..., request: _Optional[_Union[Request, _Mapping]] = ..., actor_exiting: _Optional[_Union[ActorExiting, _Mapping]] = ..., task_events: _Optional[_Union[ActorTaskEvents, _Mapping]] = ..., metrics: _Optional[_Union[MetricsReport, _Mapping]] = ..., leased_task: _Optional[_Union[LeasedTask, _Mapping]] = ...) -> None: ...

class LeasedTask(_message.Message):
    __slots__ = ("task_id", "name", "max_retries", "attempt", "finished", "job_id", "parent_task_id", "failed")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MAX_RETRIES_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_TASK_ID_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    task_id: bytes
    name: str
    max_retries: int
    attempt: int
    finished: bool
    job_id: bytes
    parent_task_id: bytes
    failed: bool
    def __init__(self, task_id: _Optional[bytes] = ..., name: _Optional[str] = ..., max_retries: _Optional[int] = ..., attempt: _Optional[int] = ..., finished: _Optional[bool] = ..., job_id: _Optional[bytes] = ..., parent_task_id: _Optional[bytes] = ..., failed: _Optional[bool] = ...) -> None: ...

class ActorTaskEvents(_message.Message):
    __slots__ = ("task_ids", "job_ids", "parent_task_ids", "names", "name_index", "attempts", "received", "finished", "failed", "counted_finished", "counted_failed")
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    JOB_IDS_FIELD_NUMBER: _ClassVar[int]
    PARENT_TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    NAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    COUNTED_FINISHED_FIELD_NUMBER: _ClassVar[int]
    COUNTED_FAILED_FIELD_NUMBER: _ClassVar[int]
    task_ids: bytes
    job_ids: bytes
    parent_task_ids: bytes
    names: _containers.RepeatedScalarFieldContainer[str]
    name_index: _containers.RepeatedScalarFieldContainer[int]
    attempts: _containers.RepeatedScalarFieldContainer[int]
    received: _containers.RepeatedScalarFieldContainer[float]
    finished: _containers.RepeatedScalarFieldContainer[float]
    failed: _containers.RepeatedScalarFieldContainer[bool]
    counted_finished: _containers.RepeatedScalarFieldContainer[int]
    counted_failed: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, task_ids: _Optional[bytes] = ..., job_ids: _Optional[bytes] = ..., parent_task_ids: _Optional[bytes] = ..., names: _Optional[_Iterable[str]] = ..., name_index: _Optional[_Iterable[int]] = ..., attempts: _Optional[_Iterable[int]] = ..., received: _Optional[_Iterable[float]] = ..., finished: _Optional[_Iterable[float]] = ..., failed: _Optional[_Iterable[bool]] = ..., counted_finished: _Optional[_Iterable[int]] = ..., counted_failed: _Optional[_Iterable[int]] = ...) -> None: ...

class ClientBatch(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[ClientEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[ClientEvent, _Mapping]]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("node_id", "store_dir", "session_dir", "node_address", "job_id")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STORE_DIR_FIELD_NUMBER: _ClassVar[int]
    SESSION_DIR_FIELD_NUMBER: _ClassVar[int]
    NODE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: bytes
    store_dir: str
    session_dir: str
    node_address: str
    job_id: bytes
    def __init__(self, node_id: _Optional[bytes] = ..., store_dir: _Optional[str] = ..., session_dir: _Optional[str] = ..., node_address: _Optional[str] = ..., job_id: _Optional[bytes] = ...) -> None: ...

class ObjectReady(_message.Message):
    __slots__ = ("value",)
    VALUE_FIELD_NUMBER: _ClassVar[int]
    value: ObjectValue
    def __init__(self, value: _Optional[_Union[ObjectValue, _Mapping]] = ...) -> None: ...

class ExecuteTask(_message.Message):
    __slots__ = ("spec", "function_pickled", "args", "assigned_gpu_ids")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_PICKLED_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    ASSIGNED_GPU_IDS_FIELD_NUMBER: _ClassVar[int]
    spec: TaskSpec
    function_pickled: bytes
    args: _containers.RepeatedCompositeFieldContainer[ObjectValue]
    assigned_gpu_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, spec: _Optional[_Union[TaskSpec, _Mapping]] = ..., function_pickled: _Optional[bytes] = ..., args: _Optional[_Iterable[_Union[ObjectValue, _Mapping]]] = ..., assigned_gpu_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ReserveReply(_message.Message):
    __slots__ = ("request_id", "path", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    path: str
    error: str
    def __init__(self, request_id: _Optional[int] = ..., path: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class KillTask(_message.Message):
    __slots__ = ("task_id", "force")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    task_id: bytes
    force: bool
    def __init__(self, task_id: _Optional[bytes] = ..., force: _Optional[bool] = ...) -> None: ...

class LogBatch(_message.Message):
    __slots__ = ("lines", "job_id")
    LINES_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    lines: _containers.RepeatedCompositeFieldContainer[LogLine]
    job_id: bytes
    def __init__(self, lines: _Optional[_Iterable[_Union[LogLine, _Mapping]]] = ..., job_id: _Optional[bytes] = ...) -> None: ...

class LogLine(_message.Message):
    __slots__ = ("prefix", "text", "is_err")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IS_ERR_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    text: str
    is_err: bool
    def __init__(self, prefix: _Optional[str] = ..., text: _Optional[str] = ..., is_err: _Optional[bool] = ...) -> None: ...

class Notice(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class Reply(_message.Message):
    __slots__ = ("request_id", "payload", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    payload: bytes
    error: str
    def __init__(self, request_id: _Optional[int] = ..., payload: _Optional[bytes] = ..., error: _Optional[str] = ...) -> None: ...

class ServerEvent(_message.Message):
    __slots__ = ("welcome", "ready", "execute", "reserve_reply", "kill", "logs", "notice", "reply", "lease")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    EXECUTE_FIELD_NUMBER: _ClassVar[int]
    RESERVE_REPLY_FIELD_NUMBER: _ClassVar[int]
    KILL_FIELD_NUMBER: _ClassVar[int]
    LOGS_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    ready: ObjectReady
    execute: ExecuteTask
    reserve_reply: ReserveReply
    kill: KillTask
    logs: LogBatch
    notice: Notice
    reply: Reply
    lease: LeaseChange
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., ready: _Optional[_Union[ObjectReady, _Mapping]] = ..., execute: _Optional[_Union[ExecuteTask, _Mapping]] = ..., reserve_reply: _Optional[_Union[ReserveReply, _Mapping]] = ..., kill: _Optional[_Union[KillTask, _Mapping]] = ..., logs: _Optional[_Union[LogBatch, _Mapping]] = ..., notice: _Optional[_Union[Notice, _Mapping]] = ..., reply: _Optional[_Union[Reply, _Mapping]] = ..., lease: _Optional[_Union[LeaseChange, _Mapping]] = ...) -> None: ...

class LeaseChange(_message.Message):
    __slots__ = ("lease_id", "holder_id", "granted")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    HOLDER_ID_FIELD_NUMBER: _ClassVar[int]
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    lease_id: bytes
    holder_id: bytes
    granted: bool
    def __init__(self, lease_id: _Optional[bytes] = ..., holder_id: _Optional[bytes] = ..., granted: _Optional[bool] = ...) -> None: ...

class ServerBatch(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[ServerEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[ServerEvent, _Mapping]]] = ...) -> None: ...

class NodeInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeInfoReply(_message.Message):
    __slots__ = ("node_id", "address", "etcd_endpoints", "session_dir", "pid")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ETCD_ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    SESSION_DIR_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    node_id: bytes
    address: str
    etcd_endpoints: str
    session_dir: str
    pid: int
    def __init__(self, node_id: _Optional[bytes] = ..., address: _Optional[str] = ..., etcd_endpoints: _Optional[str] = ..., session_dir: _Optional[str] = ..., pid: _Optional[int] = ...) -> None: ...

class SpillTask(_message.Message):
    __slots__ = ("spec", "function_pickled", "args")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_PICKLED_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    spec: TaskSpec
    function_pickled: bytes
    args: _containers.RepeatedCompositeFieldContainer[ObjectValue]
    def __init__(self, spec: _Optional[_Union[TaskSpec, _Mapping]] = ..., function_pickled: _Optional[bytes] = ..., args: _Optional[_Iterable[_Union[ObjectValue, _Mapping]]] = ...) -> None: ...

class SpillVerdict(_message.Message):
    __slots__ = ("task_id", "accepted", "reason")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    task_id: bytes
    accepted: bool
    reason: str
    def __init__(self, task_id: _Optional[bytes] = ..., accepted: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class FreeObjects(_message.Message):
    __slots__ = ("object_ids",)
    OBJECT_IDS_FIELD_NUMBER: _ClassVar[int]
    object_ids: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, object_ids: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ContainerFreed(_message.Message):
    __slots__ = ("container_id", "contained_ids")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    CONTAINED_IDS_FIELD_NUMBER: _ClassVar[int]
    container_id: bytes
    contained_ids: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, container_id: _Optional[bytes] = ..., contained_ids: _Optional[_Iterable[bytes]] = ...) -> None: ...

class PeerEvent(_message.Message):
    __slots__ = ("spill", "verdict", "result", "subscribe", "ready", "refs", "request", "reply", "free", "cancel_remote", "container_freed", "logs")
    SPILL_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIBE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    REFS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    FREE_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REMOTE_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_FREED_FIELD_NUMBER: _ClassVar[int]
    LOGS_FIELD_NUMBER: _ClassVar[int]
    spill: SpillTask
    verdict: SpillVerdict
    result: TaskResult
    subscribe: Subscribe
    ready: ObjectReady
    refs: RefUpdate
    request: Request
    reply: Reply
    free: FreeObjects
    cancel_remote: CancelTask
    container_freed: ContainerFreed
    logs: LogBatch
    def __init__(self, spill: _Optional[_Union[SpillTask, _Mapping]] = ..., verdict: _Optional[_Union[SpillVerdict, _Mapping]] = ..., result: _Optional[_Union[TaskResult, _Mapping]] = ..., subscribe: _Optional[_Union[Subscribe, _Mapping]] = ..., ready: _Optional[_Union[ObjectReady, _Mapping]] = ..., refs: _Optional[_Union[RefUpdate, _Mapping]] = ..., request: _Optional[_Union[Request, _Mapping]] = ..., reply: _Optional[_Union[Reply, _Mapping]] = ..., free: _Optional[_Union[FreeObjects, _Mapping]] = ..., cancel_remote: _Optional[_Union[CancelTask, _Mapping]] = ..., container_freed: _Optional[_Union[ContainerFreed, _Mapping]] = ..., logs: _Optional[_Union[LogBatch, _Mapping]] = ...) -> None: ...

class PeerBatch(_message.Message):
    __slots__ = ("from_node", "events", "load")
    FROM_NODE_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    from_node: bytes
    events: _containers.RepeatedCompositeFieldContainer[PeerEvent]
    load: NodeLoad
    def __init__(self, from_node: _Optional[bytes] = ..., events: _Optional[_Iterable[_Union[PeerEvent, _Mapping]]] = ..., load: _Optional[_Union[NodeLoad, _Mapping]] = ...) -> None: ...

class NodeLoad(_message.Message):
    __slots__ = ("available", "backlog_room", "queued")
    class AvailableEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    BACKLOG_ROOM_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    available: _containers.ScalarMap[str, float]
    backlog_room: int
    queued: int
    def __init__(self, available: _Optional[_Mapping[str, float]] = ..., backlog_room: _Optional[int] = ..., queued: _Optional[int] = ...) -> None: ...

class PeerAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("object_id", "chunk_size")
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    object_id: bytes
    chunk_size: int
    def __init__(self, object_id: _Optional[bytes] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class ObjectChunk(_message.Message):
    __slots__ = ("offset", "data", "total_size")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    total_size: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_size: _Optional[int] = ...) -> None: ...
