"""Runs tasks and actor method calls inside a worker process.

Work arrives on other threads (the session stream's reader, actor call
streams) and, unless an actor asked for concurrency, runs on the main thread
one item at a time, so a non-forced cancel can interrupt it with
KeyboardInterrupt. The cancel sends SIGINT to the main thread itself: a real
signal wakes a blocking sleep, wait or lock acquire (a simulated one, as
_thread.interrupt_main gives, is only seen at the next bytecode). The
handler raises only while the cancelled task's code runs, so a signal that
lands after the task finished, or between tasks, does nothing.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import pickle
import queue
import signal
import sys
import threading

from meshray import exceptions
from meshray.common import ids
from meshray.common.worker_output import context_line
from meshray.core import runtime_envs, serialization, state as state_mod
from meshray.core.actor_host import ActorExitRequested, ActorHost, MalformedArguments
from meshray.core.object_ref import ArgPlaceholder, DynamicObjectRefGenerator
from meshray.rpc.generated import meshray_pb2 as pb

__all__ = ["TaskExecutor"]

log = logging.getLogger(__name__)


class _DependencyFailed(Exception):
    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def return_id(spec, index: int) -> bytes:
    """Id of output `index`: index 0 of a stream is its completion marker."""
    if spec.num_returns < 0:
        return ids.object_id_for(spec.task_id, 0)
    return ids.object_id_for(spec.task_id, index + 1)


class TaskExecutor:
    def __init__(self):
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._functions: dict[bytes, object] = {}
        self._running: dict[bytes, int] = {}   # task id -> thread ident
        self._cancelled: set[bytes] = set()
        state_mod.state.cancelled = self._cancelled     # read by RuntimeContext.is_canceled
        # Running generator calls: a cancel stops them at their next yield.
        self._streaming: set[bytes] = set()
        # The task whose own code runs on the main thread now (None between
        # tasks, or while its outputs are packaged), and whether a cancel of
        # it still has to raise KeyboardInterrupt there.
        self._interruptible: bytes | None = None
        self._interrupt_pending = False
        self.core = None
        self.actor_host = None
        self.lease_host = None       # lease_host.LeaseHost: tasks pushed on a lease
        self._announced = None
        # Outcome of each worker_process_setup_hook run here (hook -> error or None).
        self._setup_hooks: dict[str, BaseException | None] = {}

    # ------------------------------------------------------------ inputs
    def enqueue(self, msg: pb.ExecuteTask) -> None:
        self._inbox.put(("task", msg))

    def enqueue_call(self, spec: pb.TaskSpec, reply) -> None:
        """An actor method call to run on the main thread, in order."""
        self._inbox.put(("call", (spec, reply)))

    def enqueue_leased(self, spec: pb.TaskSpec, reply) -> None:
        """A task a lease's holder pushed (lease_host.py), to run on the main thread."""
        self._inbox.put(("lease", (spec, reply)))

    def kill(self, msg) -> None:
        if msg is None:
            # The node daemon is gone; nothing we compute can be delivered.
            os._exit(1)
        self.cancel(msg.task_id)

    def is_running(self, task_id: bytes) -> bool:
        """Whether the task or actor call `task_id` has started here and not finished."""
        return task_id in self._running

    def flag_cancelled(self, task_id: bytes) -> bool:
        """Mark the running call `task_id` cancelled without interrupting it:
        `RuntimeContext.is_canceled()` then says True inside it (a plain or
        threaded actor's call is never interrupted, as in Ray); a generator
        call also stops at its next yield. False if no such call runs here."""
        if task_id not in self._running:
            return False
        self._cancelled.add(task_id)
        return True

    def cancel(self, task_id: bytes) -> None:
        thread_ident = self._running.get(task_id)
        if thread_ident is None:
            # Not started: it may be queued here behind the running task
            # (pipelined); it is answered as cancelled when its turn comes.
            if len(self._cancelled) > 10_000:
                self._cancelled.clear()
            self._cancelled.add(task_id)
            return
        self._cancelled.add(task_id)
        if thread_ident == threading.main_thread().ident:
            self._interrupt_pending = True
            signal.pthread_kill(thread_ident, signal.SIGINT)

    def _on_sigint(self, _signum, _frame) -> None:
        """Raise KeyboardInterrupt in the cancelled task, once per cancel; else ignore."""
        task_id = self._interruptible
        if task_id is not None and self._interrupt_pending and task_id in self._cancelled:
            self._interrupt_pending = False
            raise KeyboardInterrupt

    def run_forever(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._on_sigint)
        while True:
            kind, item = self._inbox.get()
            try:
                if kind == "task":
                    self._execute(item)
                elif kind == "lease":
                    self.lease_host.run(*item)
                else:
                    spec, reply = item
                    self.actor_host.run_call(spec, reply)
            except KeyboardInterrupt:
                # A cancel that landed between items: nothing to interrupt.
                continue
            except SystemExit as exc:
                # A task (or an actor's __init__) called sys.exit(): the worker
                # exits now, as the task asked, and the node handles its death
                # as any other. Returning instead would leave the process
                # hanging on its non-daemon threads, answering nothing.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(exc.code if isinstance(exc.code, int) and 0 <= exc.code < 256 else 1)

    # ------------------------------------------------------------ tasks
    def _load_function(self, msg: pb.ExecuteTask):
        return self.function_for(msg.spec, msg.function_pickled)

    def function_for(self, spec, pickled: bytes | None):
        """The function `spec` runs: loaded here before, or from `pickled`
        (the node, or a lease's holder, sends it the first time)."""
        function = self._functions.get(spec.function_id)
        if function is not None:
            return function
        if not pickled:
            raise exceptions.RaySystemError(
                f"function for task {spec.name} was never shipped to this worker")
        try:
            function = pickle.loads(pickled)
        except ModuleNotFoundError as exc:
            raise exceptions.RaySystemError(
                f"Failed to unpickle the function of task {spec.name}: module "
                f"{exc.name!r} is not importable on this worker (node "
                f"{self.core.node_id.hex()}). Install it there, or ship it with "
                f"runtime_env={{'py_modules': [...]}}.") from exc
        self._functions[spec.function_id] = function
        state_mod.state.function_names[spec.function_id] = (
            getattr(function, "__module__", None) or "",
            getattr(function, "__qualname__", None) or spec.name)
        return function

    def resolve_args(self, spec, values: list):
        """Rebuild (args, kwargs) from args_blob and the resolved ref values."""
        args, kwargs = serialization.deserialize_inline(spec.args_blob)

        def fill(item):
            return values[item.index] if isinstance(item, ArgPlaceholder) else item

        return [fill(a) for a in args], {k: fill(v) for k, v in kwargs.items()}

    def _materialize_args(self, arg_values) -> list:
        values = []
        for value in arg_values:
            try:
                values.append(self.core.materialize(value))
            except exceptions.RayError as error:
                raise _DependencyFailed(error) from None
        return values

    def fetch_arg_values(self, spec) -> list:
        """Values of a call's top-level ref arguments, fetched through the node."""
        from meshray.core.object_ref import ObjectRef
        if not spec.arg_ref_ids:
            return []
        refs = [ObjectRef(object_id) for object_id in spec.arg_ref_ids]
        try:
            return self.core.get(refs)
        except exceptions.RayError as error:
            raise _DependencyFailed(error) from None

    def _announce(self, spec) -> None:
        """Tell the node whose output follows -- only when that changes."""
        context = (spec.job_id, spec.name)
        if context == self._announced:
            return
        self._announced = context
        sys.stdout.flush()
        sys.stderr.flush()
        marker = context_line(spec.job_id.hex(), spec.name)
        sys.stdout.write(marker)
        sys.stdout.flush()
        sys.stderr.write(marker)
        sys.stderr.flush()

    def _execute(self, msg: pb.ExecuteTask) -> None:
        spec = msg.spec
        state_mod.state.gpu_ids = list(msg.assigned_gpu_ids)
        # A worker runs in the namespace of the job whose task it runs; an
        # actor's worker keeps its creator's job namespace for every call.
        state_mod.state.namespace = spec.namespace
        hook_error = self._run_setup_hook(spec)
        if hook_error is not None:
            result = pb.TaskResult(task_id=spec.task_id)
            self.fail(result, spec, hook_error)
            if spec.actor_creation:
                result.actor_error = str(hook_error)
            self.core.send_task_result(result)
            return
        if spec.actor_creation:
            self._create_actor(msg)
            return
        if spec.task_id in self._cancelled:
            self._cancelled.discard(spec.task_id)
            result = pb.TaskResult(task_id=spec.task_id)
            self.fail(result, spec, exceptions.TaskCancelledError(spec.task_id.hex()))
            self.core.send_task_result(result)
            return

        def body():
            function = self._load_function(msg)
            args, kwargs = self.resolve_args(spec, self._materialize_args(msg.args))
            return function(*args, **kwargs)

        self.run(spec, body, self.core.send_task_result)

    def _run_setup_hook(self, spec) -> BaseException | None:
        """Run the env's worker_process_setup_hook once in this process, before
        its first task; its error (if it failed) fails every task here.

        A worker serves one runtime env (its pool is keyed by the env, hook
        included), so the first task's hook is the worker's hook.
        """
        if not spec.runtime_env_json or "worker_process_setup_hook" not in spec.runtime_env_json:
            return None
        hook = json.loads(spec.runtime_env_json).get("worker_process_setup_hook")
        if not hook:
            return None
        if hook not in self._setup_hooks:
            try:
                runtime_envs.run_setup_hook(hook)
                self._setup_hooks[hook] = None
            except exceptions.RuntimeEnvSetupError as error:
                self._setup_hooks[hook] = error
        return self._setup_hooks[hook]

    def run(self, spec, body, deliver, send_item=None) -> pb.TaskResult:
        """Run `body()` as the task `spec`, package its outputs or error, deliver them.

        `deliver` is called while the outputs are still referenced here, so
        refs nested in them are handed on before this frame lets them go.
        A generator's items go to `send_item` as they are yielded (default:
        the node, for a task; an actor call sends them on its call link).
        """
        core = self.core
        core.current_task_id = spec.task_id
        state_mod.set_current_spec(spec)
        self._running[spec.task_id] = threading.get_ident()
        self._announce(spec)
        streaming = spec.num_returns < 0
        if streaming:
            self._streaming.add(spec.task_id)
        on_main = threading.current_thread() is threading.main_thread()
        result = pb.TaskResult(task_id=spec.task_id)
        try:
            try:
                if on_main:
                    self._interruptible = spec.task_id
                try:
                    if on_main and spec.task_id in self._cancelled:
                        # Cancelled while it was being set up: its signal may
                        # have come before it was interruptible.
                        self._interrupt_pending = False
                        raise KeyboardInterrupt
                    output = body()
                    if inspect.iscoroutine(output):
                        raise TypeError(f"{spec.name} returned a coroutine outside an async actor")
                    if streaming:
                        outputs = [self._stream(spec, output, send_item)]
                    else:
                        if spec.dynamic_returns:
                            output = self._dynamic(spec, output)
                        outputs = self._split_returns(spec, output)
                finally:
                    if on_main:
                        self._interruptible = None
                for index, value in enumerate(outputs):
                    serialized = serialization.serialize(
                        value, what=f"return value {index} of {spec.name}")
                    result.returns.append(core.store_value(return_id(spec, index), serialized,
                                                           local=False))
            except (KeyboardInterrupt, asyncio.CancelledError):
                # A cancel's interrupt, an async call's cancelled coroutine, or
                # (as in Ray) a KeyboardInterrupt the task's own code raised:
                # each makes the task cancelled, never a lost result.
                self.fail(result, spec, exceptions.TaskCancelledError(spec.task_id.hex()))
            except _DependencyFailed as failure:
                self.fail(result, spec, failure.error)
            except (ActorExitRequested, MalformedArguments):
                raise   # the actor exits, or ends the call's stream (actor_host)
            except Exception as exc:  # noqa: BLE001 - the user's error becomes the result
                if spec.task_id in self._cancelled:
                    # Whatever the interrupted code raised on its way out.
                    self.fail(result, spec, exceptions.TaskCancelledError(spec.task_id.hex()))
                else:
                    self.fail(result, spec, self.wrap(spec, exc),
                              retryable=self._retryable(spec, exc))
            sys.stdout.flush()
            sys.stderr.flush()
            deliver(result)
            return result
        finally:
            self._running.pop(spec.task_id, None)
            self._streaming.discard(spec.task_id)
            self._cancelled.discard(spec.task_id)
            core.current_task_id = b""
            state_mod.set_current_spec(None)

    # ------------------------------------------------------------ actors
    def _create_actor(self, msg: pb.ExecuteTask) -> pb.TaskResult:
        spec = msg.spec
        address = []

        def body():
            cls = self._load_function(msg)
            args, kwargs = self.resolve_args(spec, self._materialize_args(msg.args))
            host = ActorHost(self, spec, cls)
            host.construct(args, kwargs)
            self.actor_host = host
            address.append(host.start_server())
            return None

        result = self.run(spec, body, lambda _result: None)
        if result.failed:
            try:
                error = pickle.loads(result.returns[0].inline_data) if result.returns else None
            except Exception:  # noqa: BLE001
                error = None
            result.actor_error = str(error) if error is not None else "__init__ failed"
        elif address:
            result.actor_address = address[0]
        self.core.send_task_result(result)
        return result

    # ------------------------------------------------------------ outputs
    def item_sink(self, spec, send_item=None) -> "ItemSink":
        """Where the items of the generator call `spec` go, numbered as they are sent."""
        return ItemSink(self, spec, send_item or self.core.send_task_result)

    def _stream(self, spec, generator, send_item=None) -> int:
        """Send each yielded item as soon as it exists; return how many."""
        if isinstance(generator, ItemSink):
            return generator.count      # an async generator, streamed as it ran
        if not inspect.isgenerator(generator) and not hasattr(generator, "__iter__"):
            raise TypeError(f"{spec.name} has num_returns='streaming' but returned "
                            f"{type(generator).__name__}, not a generator")
        sink = self.item_sink(spec, send_item)
        try:
            for item in generator:
                sink.send(item)
                if spec.task_id in self._cancelled:
                    # Cancelled: stop at this yield (the generator's finally
                    # blocks run) and answer the call TaskCancelledError.
                    getattr(generator, "close", lambda: None)()
                    raise KeyboardInterrupt
        except (KeyboardInterrupt, ActorExitRequested):
            raise
        except Exception as exc:  # noqa: BLE001 - the error is the stream's last item
            sink.fail(self.wrap(spec, exc))
        return sink.count

    def _dynamic(self, spec, generator) -> DynamicObjectRefGenerator:
        """num_returns="dynamic": store each yielded value, return refs to them all."""
        try:
            iterator = iter(generator)
        except TypeError:
            raise TypeError(f"{spec.name} has num_returns='dynamic' but returned "
                            f"{type(generator).__name__}, not a generator") from None
        refs = []
        try:
            for item in iterator:
                refs.append(self.core.put(item))
        except (KeyboardInterrupt, ActorExitRequested):
            raise
        except Exception as exc:  # noqa: BLE001 - as in Ray, the error is the last ref
            refs.append(self.core.put_error(self.wrap(spec, exc)))
        return DynamicObjectRefGenerator(refs)

    @staticmethod
    def _split_returns(spec, output) -> list:
        count = spec.num_returns
        if count == 1:
            return [output]
        if count == 0:
            return []
        try:
            outputs = list(output)
        except TypeError:
            outputs = None
        if outputs is None or len(outputs) != count:
            got = "a non-iterable" if outputs is None else f"{len(outputs)} values"
            raise ValueError(f"Task {spec.name} returned {got}, but num_returns={count}.")
        return outputs

    def wrap(self, spec, exc: BaseException) -> exceptions.RayTaskError:
        return exceptions.RayTaskError.from_exception(
            exc, spec.name, task_id=spec.task_id.hex(),
            actor_id=spec.actor_id.hex() if spec.actor_id else None,
            node_id=self.core.node_id.hex() if self.core else None)

    @staticmethod
    def _retryable(spec, exc: BaseException) -> bool:
        if not spec.retry_exceptions:
            return False
        if not spec.retry_exception_types:
            return True
        try:
            return isinstance(exc, pickle.loads(spec.retry_exception_types))
        except Exception as problem:  # noqa: BLE001 - the task fails without a retry instead
            # Raised here it would escape the handler packaging the task's
            # error and end this worker's loop.
            log.warning("task %s: retry_exception_types is not a pickled tuple of exception "
                        "classes (%s: %s); not retrying", spec.name, type(problem).__name__,
                        problem)
            return False

    @staticmethod
    def fail(result: pb.TaskResult, spec, error: BaseException, retryable: bool = False) -> None:
        del result.returns[:]
        result.failed = True
        result.retryable_error = retryable
        blob = serialization.serialize_error(error)
        outputs = 1 if spec.num_returns < 0 else max(spec.num_returns, 0)
        for index in range(outputs):
            result.returns.append(pb.ObjectValue(object_id=return_id(spec, index),
                                                 inline_data=blob, is_error=True))


class ItemSink:
    """Sends the items of one generator call, numbered from 1 in order."""

    def __init__(self, executor: TaskExecutor, spec, send_item):
        self._executor = executor
        self._spec = spec
        self._send_item = send_item
        self.count = 0

    def send(self, item) -> None:
        serialized = serialization.serialize(
            item, what=f"item {self.count} yielded by {self._spec.name}")
        self.count += 1
        self._send(self._executor.core.store_value(self._item_id(), serialized, local=False))

    def fail(self, error: BaseException) -> None:
        """The generator raised: its error is the stream's last item."""
        self.count += 1
        self._send(pb.ObjectValue(object_id=self._item_id(), is_error=True,
                                  inline_data=serialization.serialize_error(error)))

    def _item_id(self) -> bytes:
        return ids.object_id_for(self._spec.task_id, self.count)

    def _send(self, value: pb.ObjectValue) -> None:
        self._send_item(pb.TaskResult(task_id=self._spec.task_id, returns=[value],
                                      stream_item_id=value.object_id, stream_index=self.count))
