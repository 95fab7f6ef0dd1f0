"""`@meshray.remote` on a function: the RemoteFunction and its submission."""
from __future__ import annotations

import functools
import hashlib
import inspect

import cloudpickle

from meshray.common import ids
from meshray.core import options as opts, state as state_mod
from meshray.core.object_ref import ObjectRef, ObjectRefGenerator
from meshray.rpc.generated import meshray_pb2 as pb
from meshray.scheduler.strategies import PlacementGroupSchedulingStrategy

__all__ = ["RemoteFunction", "build_task_spec_fields"]


def _inherited_strategy():
    """A parent's placement group, for children when it captures them (Ray's rule)."""
    parent = state_mod.current_spec()
    blob = parent.strategy_blob if parent is not None else state_mod.state.actor_strategy_blob
    if not blob:
        return None
    strategy = cloudpickle.loads(blob)
    if getattr(strategy, "placement_group_capture_child_tasks", False):
        return PlacementGroupSchedulingStrategy(strategy.placement_group, -1, True)
    return None


def _check_group_fits(strategy, placement: dict) -> None:
    """A request that can never fit its bundle is a ValueError now, not a hang later."""
    if not isinstance(strategy, PlacementGroupSchedulingStrategy):
        return
    # Here, not at the top: the placement package loads the etcd client, which
    # only programs that use placement groups need.
    from meshray.placement.policy import check_placement_group_index, validate_request_fits_bundle
    group = strategy.placement_group
    check_placement_group_index(group, strategy.placement_group_bundle_index)
    validate_request_fits_bundle(group.bundle_specs, strategy.placement_group_bundle_index,
                                 {k: v for k, v in placement.items() if v})


def build_task_spec_fields(spec: pb.TaskSpec, options: dict, placement: dict) -> None:
    """Fill the option-derived fields of a TaskSpec."""
    for name, amount in placement.items():
        if amount:
            spec.resources[name] = float(amount)
    strategy = opts.scheduling_strategy_from_options(options)
    if strategy is None or strategy == "DEFAULT":
        strategy = _inherited_strategy() or "DEFAULT"
    _check_group_fits(strategy, placement)
    if isinstance(strategy, str):
        spec.scheduling_strategy = strategy
    else:
        spec.scheduling_strategy = type(strategy).__name__
        spec.strategy_blob = cloudpickle.dumps(strategy)
    from meshray.core.runtime_envs import attach_runtime_env
    attach_runtime_env(spec, options.get("runtime_env"), state_mod.ensure_core())


def _check_runtime_env(options: dict) -> None:
    """Reject a bad runtime_env when it is declared, not when a task runs."""
    if options.get("runtime_env"):
        from meshray.runtime_env import validate_runtime_env
        validate_runtime_env(options["runtime_env"])


class RemoteFunction:
    """A function that runs as a task when called with `.remote()`."""

    def __init__(self, function, options: dict):
        opts.validate_task_options(options, in_options=False)
        _check_runtime_env(options)
        self._function = function
        self._is_generator = inspect.isgeneratorfunction(function)
        self._default_options = {**opts.task_defaults(self._is_generator), **options}
        self._name = f"{function.__module__}.{function.__qualname__}" \
            if function.__module__ != "__main__" else function.__qualname__
        self._pickled: bytes | None = None
        self._function_id: bytes | None = None
        functools.update_wrapper(self, function)

    def __call__(self, *args, **kwargs):
        raise TypeError(
            f"Remote functions cannot be called directly. Instead of running "
            f"'{self._function.__name__}()', try '{self._function.__name__}.remote()'.")

    def options(self, **task_options):
        opts.validate_task_options(task_options, in_options=True)
        _check_runtime_env(task_options)
        merged = opts.merge_options(self._default_options, task_options)
        parent = self

        class _Options:
            def remote(self, *args, **kwargs):
                return parent._remote(args, kwargs, merged)

            def bind(self, *args, **kwargs):
                raise NotImplementedError("meshray does not support Ray DAGs (bind)")

        return _Options()

    def remote(self, *args, **kwargs):
        return self._remote(args, kwargs, self._default_options)

    def _pickle(self) -> bytes:
        if self._pickled is None:
            try:
                self._pickled = cloudpickle.dumps(self._function)
            except Exception as exc:  # noqa: BLE001
                raise TypeError(f"could not serialize remote function {self._name}: {exc}") from exc
            self._function_id = hashlib.sha256(self._pickled).digest()[:16]
        return self._pickled

    def _remote(self, args, kwargs, options):
        core = state_mod.ensure_core()
        self._pickle()
        core.ensure_function(self._function_id, lambda: self._pickled, self._name)
        num_returns = options.get("num_returns", 1)
        streaming = num_returns == "streaming"
        dynamic = num_returns == "dynamic"
        task_id = core.new_task_id()
        args_blob, arg_refs, contained, keepalive = core.build_args(args, kwargs, self._name)
        parent = state_mod.current_spec()
        spec = pb.TaskSpec(
            task_id=task_id, job_id=parent.job_id if parent is not None else core.job_id,
            function_id=self._function_id, name=options.get("name") or self._name,
            args_blob=args_blob, arg_ref_ids=arg_refs, contained_ids=contained,
            num_returns=-1 if streaming else 1 if dynamic else int(num_returns),
            dynamic_returns=dynamic,
            max_retries=int(options.get("max_retries", 3)), owner_id=core.worker_id,
            parent_task_id=parent.task_id if parent is not None else b"",
            namespace=state_mod.state.namespace)
        retry = options.get("retry_exceptions", False)
        if retry:
            spec.retry_exceptions = True
            if not isinstance(retry, bool):
                # By value: classes from the driver's __main__ must load in a worker.
                spec.retry_exception_types = cloudpickle.dumps(tuple(retry))
        placement, _held = opts.resource_request(options, for_actor=False)
        build_task_spec_fields(spec, options, placement)
        if streaming:
            generator = ObjectRefGenerator(task_id, core)
            core.submit(spec, keepalive)
            return generator
        return_ids = [ids.object_id_for(task_id, i + 1) for i in range(spec.num_returns)]
        lease = core.leases.take(spec)
        if lease is not None:
            # Pushed straight to a leased worker: the returns are ours alone
            # until a ref to one leaves this process (task_leases.py).
            core.mark_local_only(return_ids)
            refs = [ObjectRef(object_id) for object_id in return_ids]
            core.leases.push(lease, spec, return_ids, keepalive, self._pickled)
        else:
            core.mark_node_knows(return_ids)   # the submission makes us their holder
            refs = [ObjectRef(object_id) for object_id in return_ids]
            core.submit(spec, keepalive)
        if spec.num_returns == 0:
            return None
        return refs[0] if spec.num_returns == 1 else refs
