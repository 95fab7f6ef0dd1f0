"""Actors: `@meshray.remote` on a class, handles, methods, `exit_actor`.

An actor is a worker process that holds an instance of the class. Creating
one submits a creation task to the local node (it is placed like any task
and then keeps its worker); its record lives in etcd; method calls go
straight from the caller's process to the actor's process.
"""
from __future__ import annotations

import hashlib
import inspect
import json

import cloudpickle

from meshray import exceptions
from meshray.common import ids
from meshray.core import arg_files, options as opts, state as state_mod
from meshray.core.actor_host import ActorExitRequested
from meshray.core.object_ref import ObjectRef, ObjectRefGenerator
from meshray.rpc.generated import meshray_pb2 as pb

__all__ = ["ActorClass", "ActorHandle", "ActorMethod", "method", "exit_actor", "get_actor"]

_METHOD_OPTIONS_ATTR = "__meshray_method_options__"
ACTOR_ARG_INLINE_LIMIT = arg_files.MAX_IMAGE_BYTES


def method(*args, **kwargs):
    """Set per-method defaults: `@meshray.method(num_returns=2, concurrency_group="io")`."""
    if args:
        raise TypeError("@meshray.method takes keyword arguments only, e.g. "
                        "@meshray.method(num_returns=2)")
    opts.validate_method_options(kwargs)

    def decorate(function):
        setattr(function, _METHOD_OPTIONS_ATTR, dict(kwargs))
        return function

    return decorate


def exit_actor():
    """Exit the current actor after this method returns control.

    The actor is marked DEAD (it is not restarted); the call that invoked
    exit_actor, and every later call, get ActorDiedError.
    """
    if not state_mod.state.actor_id:
        raise TypeError("exit_actor() called outside an actor")
    raise ActorExitRequested()


def _method_table(cls) -> tuple[dict, bool]:
    table = {}
    is_async = False
    for name, member in inspect.getmembers(cls, predicate=inspect.isfunction):
        if name.startswith("__") and name not in ("__call__",):
            continue
        options = dict(getattr(member, _METHOD_OPTIONS_ATTR, {}))
        if inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member):
            is_async = True
        # As in Ray, a generator method streams unless told otherwise.
        num_returns = opts.resolve_num_returns(
            options.get("num_returns"),
            inspect.isgeneratorfunction(member) or inspect.isasyncgenfunction(member))
        table[name] = {"num_returns": num_returns,
                       "concurrency_group": options.get("concurrency_group") or "",
                       "max_task_retries": options.get("max_task_retries"),
                       "retry_exceptions": bool(options.get("retry_exceptions", False))}
    return table, is_async


class ActorClass:
    """What `@meshray.remote` returns for a class."""

    def __init__(self, cls, options: dict):
        from meshray.core.remote_function import _check_runtime_env
        opts.validate_actor_options(options, in_options=False)
        _check_runtime_env(options)
        self._cls = cls
        self._default_options = {**opts.actor_defaults(), **options}
        self._methods, self._is_async = _method_table(cls)
        self._pickled: bytes | None = None
        self._class_id: bytes | None = None
        self.__name__ = cls.__name__
        self.__qualname__ = cls.__qualname__
        self.__doc__ = cls.__doc__

    def __call__(self, *args, **kwargs):
        raise TypeError(f"Actors cannot be instantiated directly. Instead of "
                        f"'{self._cls.__name__}()', use '{self._cls.__name__}.remote()'.")

    def options(self, **actor_options):
        from meshray.core.remote_function import _check_runtime_env
        opts.validate_actor_options(actor_options, in_options=True)
        _check_runtime_env(actor_options)
        merged = opts.merge_options(self._default_options, actor_options)
        parent = self

        class _Options:
            def remote(self, *args, **kwargs):
                return parent._remote(args, kwargs, merged)

        return _Options()

    def remote(self, *args, **kwargs):
        return self._remote(args, kwargs, self._default_options)

    def _pickle(self):
        if self._pickled is None:
            try:
                self._pickled = cloudpickle.dumps(self._cls)
            except Exception as exc:  # noqa: BLE001
                raise TypeError(f"could not serialize actor class {self._cls.__name__}: {exc}") from exc
            self._class_id = hashlib.sha256(self._pickled).digest()[:16]

    def _remote(self, args, kwargs, options):
        core = state_mod.ensure_core()
        self._pickle()
        name = options.get("name") or ""
        namespace = options.get("namespace")
        if namespace is None:
            namespace = state_mod.state.namespace
        actor_id = core.new_task_id()  # prefixed with the owner node, like task ids
        if name:
            claim = core.request("claim_actor_name", {
                "name": name, "namespace": namespace, "actor_id": actor_id.hex()})
            if not claim["claimed"]:
                if options.get("get_if_exists"):
                    return get_actor(name, namespace=namespace)
                raise exceptions.ActorAlreadyExistsError(name, namespace, claim.get("existing"))
        class_name = self._cls.__name__
        core.ensure_function(self._class_id, lambda: self._pickled, class_name)
        args_blob, arg_refs, contained, keepalive = core.build_args(
            args, kwargs, f"{class_name}.__init__")
        placement, held = opts.resource_request(options, for_actor=True)
        actor_options = {
            "class_name": class_name, "methods": self._methods, "is_async": self._is_async,
            "name": name, "namespace": namespace, "lifetime": options.get("lifetime"),
            "max_restarts": options.get("max_restarts", 0),
            "max_task_retries": options.get("max_task_retries", 0),
            "max_concurrency": options.get("max_concurrency"),
            "concurrency_groups": options.get("concurrency_groups") or {},
            "max_pending_calls": options.get("max_pending_calls", -1),
        }
        parent = state_mod.current_spec()
        spec = pb.TaskSpec(
            task_id=core.new_task_id(), job_id=parent.job_id if parent is not None else core.job_id,
            function_id=self._class_id, name=f"{class_name}.__init__", args_blob=args_blob,
            arg_ref_ids=arg_refs, contained_ids=contained, num_returns=1, max_retries=0,
            owner_id=core.worker_id, actor_id=actor_id, actor_creation=True,
            actor_options=json.dumps(actor_options).encode(),
            parent_task_id=parent.task_id if parent is not None else b"",
            namespace=state_mod.state.namespace)   # the job's, whatever the actor's name's
        from meshray.core.remote_function import build_task_spec_fields
        build_task_spec_fields(spec, options, placement)
        for resource, amount in held.items():
            if amount:
                spec.held_resources[resource] = float(amount)
        ready = ObjectRef(ids.object_id_for(spec.task_id, 1))
        core.submit(spec, keepalive)
        record = {"actor_id": actor_id.hex(), "class_name": class_name, "methods": self._methods,
                  "max_task_retries": actor_options["max_task_retries"],
                  "max_pending_calls": actor_options["max_pending_calls"], "name": name}
        owned = not name and options.get("lifetime") != "detached"
        return ActorHandle._from_record(record, owner_ready=ready, gc_terminates=owned)


class ActorHandle:
    """A reference to an actor; picklable, so it can be passed to tasks and actors."""

    def __init__(self, actor_id: bytes, class_name: str, methods: dict, max_task_retries: int,
                 max_pending_calls: int = -1, name: str = ""):
        self._actor_id = actor_id
        self._class_name = class_name
        self._methods = methods
        self._max_task_retries = max_task_retries
        self._max_pending_calls = max_pending_calls
        self._name = name
        self._ready_ref = None
        self._gc_terminates = False

    @classmethod
    def _from_record(cls, record: dict, *, owner_ready=None, gc_terminates=False):
        handle = cls(bytes.fromhex(record["actor_id"]), record.get("class_name", ""),
                     record.get("methods", {}), int(record.get("max_task_retries", 0)),
                     int(record.get("max_pending_calls", -1)), record.get("name", ""))
        handle._ready_ref = owner_ready
        handle._gc_terminates = gc_terminates
        return handle

    def __getattr__(self, name: str):
        if name.startswith("_") and name not in ("__ray_terminate__", "__ray_ready__"):
            raise AttributeError(name)
        if name in ("__ray_terminate__", "__ray_ready__"):
            return ActorMethod(self, name, {"num_returns": 1, "concurrency_group": ""})
        meta = self._methods.get(name)
        if meta is None:
            raise AttributeError(f"'{self._class_name}' object has no attribute '{name}'")
        return ActorMethod(self, name, meta)

    def __reduce__(self):
        # A handle that leaves this process is shared: its lifetime is the owner's.
        self._gc_terminates = False
        return (ActorHandle, (self._actor_id, self._class_name, self._methods,
                              self._max_task_retries, self._max_pending_calls, self._name))

    def __del__(self):
        if not self._gc_terminates:
            return
        try:
            core = state_mod.state.core
            if core is not None and not core._closed:
                ActorMethod(self, "__ray_terminate__", {"num_returns": 1}).remote()
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass

    def __repr__(self):
        return f"Actor({self._class_name}, {self._actor_id.hex()})"

    def __eq__(self, other):
        return isinstance(other, ActorHandle) and other._actor_id == self._actor_id

    def __hash__(self):
        return hash(self._actor_id)

    @property
    def _actor_id_hex(self) -> str:
        return self._actor_id.hex()


class ActorMethod:
    def __init__(self, handle: ActorHandle, name: str, meta: dict, overrides: dict | None = None):
        self._handle = handle
        self._name = name
        self._meta = meta
        self._overrides = overrides or {}

    def __call__(self, *args, **kwargs):
        raise TypeError(f"Actor methods cannot be called directly. Instead of running "
                        f"'object.{self._name}()', try 'object.{self._name}.remote()'.")

    def options(self, **method_options):
        opts.validate_method_options(method_options, in_options=True)
        return ActorMethod(self._handle, self._name, self._meta,
                           {**self._overrides, **method_options})

    def remote(self, *args, **kwargs):
        core = state_mod.ensure_core()
        handle = self._handle
        num_returns = self._overrides.get("num_returns", self._meta.get("num_returns", 1))
        streaming, dynamic = num_returns == "streaming", num_returns == "dynamic"
        # On the wire a stream has num_returns -1 (its one return id, index 0,
        # is its end); a dynamic call has one return, the generator of refs.
        num_returns = -1 if streaming else 1 if dynamic else int(
            num_returns if num_returns is not None else 1)
        retries = self._overrides.get("max_task_retries", self._meta.get("max_task_retries"))
        if retries is None:
            retries = handle._max_task_retries
        connection = core.actor_connection(handle._actor_id, max_task_retries=retries,
                                           class_name=handle._class_name)
        if 0 <= handle._max_pending_calls <= connection.num_pending:
            raise exceptions.PendingCallsLimitExceeded(
                f"The actor {handle._class_name} ({handle._actor_id.hex()}) has "
                f"{connection.num_pending} pending calls, its max_pending_calls="
                f"{handle._max_pending_calls}.")
        label = f"{handle._class_name}.{self._name}"
        # Arguments go straight to the actor, never through the node: small
        # ones as a pickle, large ones as an image the actor maps zero-copy
        # (a file in the node's shared memory when the actor is on this
        # node), very large ones (> ACTOR_ARG_INLINE_LIMIT) via the store.
        call_args = arg_files.build_call_args(core, args, kwargs, label,
                                              same_node=connection.same_node is True)
        contained = call_args.contained
        keepalive = call_args.keepalive
        keepalive.extend(ObjectRef(object_id) for object_id in contained)
        parent = state_mod.current_spec()
        task_id = core.new_task_id()
        spec = pb.TaskSpec(
            task_id=task_id, job_id=parent.job_id if parent is not None else core.job_id,
            name=self._overrides.get("name") or label, args_blob=call_args.blob,
            arg_ref_ids=call_args.arg_refs, contained_ids=contained, num_returns=num_returns,
            owner_id=core.worker_id, actor_id=handle._actor_id, method_name=self._name,
            concurrency_group=self._overrides.get(
                "concurrency_group", self._meta.get("concurrency_group") or ""),
            parent_task_id=parent.task_id if parent is not None else b"",
            args_image=call_args.image, args_file=call_args.file, dynamic_returns=dynamic)
        if streaming:
            end_id = ids.object_id_for(task_id, 0)
            core.mark_local_only([end_id])
            generator = ObjectRefGenerator(task_id, core, direct=True)
            connection.submit(spec, [end_id], keepalive, retries, arg_file=call_args.file)
            return generator
        return_ids = [ids.object_id_for(task_id, i + 1) for i in range(num_returns)]
        core.mark_local_only(return_ids)
        refs = [ObjectRef(object_id) for object_id in return_ids]
        connection.submit(spec, return_ids, keepalive, retries, arg_file=call_args.file)
        if num_returns == 0:
            return None
        return refs[0] if num_returns == 1 else refs


def get_actor(name: str, namespace: str | None = None):
    """The handle of the live named actor `name` in `namespace` (default: the job's)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"get_actor() argument name={name!r} must be a non-empty string")
    core = state_mod.ensure_core()
    namespace = state_mod.state.namespace if namespace is None else namespace
    record = core.request("get_named_actor", {"name": name, "namespace": namespace})
    if record.get("state") in ("UNKNOWN", "DEAD"):
        raise ValueError(f"Failed to look up actor with name '{name}'. This could because "
                         f"1. You are trying to look up a named actor you didn't create. "
                         f"2. The named actor died. 3. You did not use a namespace matching "
                         f"the namespace of the actor (namespace {namespace!r}).")
    return ActorHandle._from_record(record)
