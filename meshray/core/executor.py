"""Runs tasks inside a worker process.

Tasks arrive on the core worker's reader thread and run on the main thread,
one at a time, so a non-forced cancel can interrupt the task with
KeyboardInterrupt (signals and interrupt_main only reach the main thread).
"""
from __future__ import annotations

import _thread
import inspect
import logging
import os
import pickle
import queue
import socket
import sys
import traceback

from meshray import exceptions
from meshray.core import ids, serialization, state as state_mod
from meshray.core.core_worker import ArgPlaceholder
from meshray.node.worker_pool import CONTEXT_MARKER
from meshray.rpc.generated import meshray_pb2 as pb

__all__ = ["TaskExecutor"]

log = logging.getLogger(__name__)


class _DependencyFailed(Exception):
    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


class TaskExecutor:
    def __init__(self):
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._functions: dict[bytes, object] = {}
        self._running: bytes = b""
        self._cancel_requested: bytes = b""
        self.core = None

    # Called on the reader thread.
    def enqueue(self, msg: pb.ExecuteTask) -> None:
        self._inbox.put(msg)

    def kill(self, msg) -> None:
        if msg is None:
            # The node daemon is gone; nothing we compute can be delivered.
            os._exit(1)
        if msg.task_id and msg.task_id == self._running:
            self._cancel_requested = msg.task_id
            _thread.interrupt_main()

    def run_forever(self) -> None:
        while True:
            msg = self._inbox.get()
            if msg is None:
                return
            try:
                self._execute(msg)
            except KeyboardInterrupt:
                # A cancel that landed between tasks: nothing to interrupt.
                continue

    # ------------------------------------------------------------ one task
    def _load_function(self, msg: pb.ExecuteTask):
        function = self._functions.get(msg.spec.function_id)
        if function is not None:
            return function
        if not msg.function_pickled:
            raise exceptions.RaySystemError(
                f"function for task {msg.spec.name} was never shipped to this worker")
        try:
            function = pickle.loads(msg.function_pickled)
        except ModuleNotFoundError as exc:
            raise exceptions.RaySystemError(
                f"Failed to unpickle the function of task {msg.spec.name}: module "
                f"{exc.name!r} is not importable on this worker (node "
                f"{self.core.node_id.hex()}). Install it there, or ship it with "
                f"runtime_env={{'py_modules': [...]}}.") from exc
        self._functions[msg.spec.function_id] = function
        return function

    def _resolve_args(self, msg: pb.ExecuteTask):
        values = []
        for value in msg.args:
            try:
                values.append(self.core.materialize(value))
            except exceptions.RayError as error:
                raise _DependencyFailed(error) from None
        args, kwargs = serialization.deserialize_inline(msg.spec.args_blob)

        def fill(item):
            return values[item.index] if isinstance(item, ArgPlaceholder) else item

        return [fill(a) for a in args], {k: fill(v) for k, v in kwargs.items()}

    def _execute(self, msg: pb.ExecuteTask) -> None:
        spec = msg.spec
        core = self.core
        core.current_task_id = spec.task_id
        state_mod.set_current_spec(spec)
        self._running = spec.task_id
        self._cancel_requested = b""
        sys.stdout.flush()
        sys.stderr.flush()
        marker = f"{CONTEXT_MARKER}{spec.job_id.hex()} {spec.name}\n"
        sys.stdout.write(marker)
        sys.stdout.flush()
        sys.stderr.write(marker)
        sys.stderr.flush()
        streaming = spec.num_returns < 0
        result = pb.TaskResult(task_id=spec.task_id)
        try:
            try:
                function = self._load_function(msg)
                args, kwargs = self._resolve_args(msg)
                if streaming:
                    count = self._stream(spec, function(*args, **kwargs))
                    outputs = [count]
                else:
                    outputs = self._split_returns(spec, function(*args, **kwargs))
                for index, output in enumerate(outputs):
                    object_id = (ids.object_id_for(spec.task_id, 0) if streaming
                                 else ids.object_id_for(spec.task_id, index + 1))
                    serialized = serialization.serialize(
                        output, what=f"return value {index} of {spec.name}")
                    result.returns.append(core.store_value(object_id, serialized, local=False))
            except KeyboardInterrupt:
                if self._cancel_requested != spec.task_id:
                    raise
                self._fail(result, spec, exceptions.TaskCancelledError(spec.task_id.hex()))
            except _DependencyFailed as failure:
                self._fail(result, spec, failure.error)
            except Exception as exc:  # noqa: BLE001 - the user's error becomes the result
                self._fail(result, spec, self._wrap(spec, exc), retryable=self._retryable(spec, exc))
            sys.stdout.flush()
            sys.stderr.flush()
            core.send_task_result(result)
        finally:
            self._running = b""
            core.current_task_id = b""
            state_mod.set_current_spec(None)

    def _stream(self, spec, generator) -> int:
        """Send each yielded item as soon as it exists; return how many."""
        if not inspect.isgenerator(generator) and not hasattr(generator, "__iter__"):
            raise TypeError(f"{spec.name} has num_returns='streaming' but returned "
                            f"{type(generator).__name__}, not a generator")
        count = 0
        try:
            for item in generator:
                count += 1
                self._send_item(spec, count, serialization.serialize(
                    item, what=f"item {count - 1} yielded by {spec.name}"))
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - the error is the stream's last item
            count += 1
            error = self._wrap(spec, exc)
            self._send_item(spec, count, None, error=error)
        return count

    def _send_item(self, spec, index: int, serialized, error=None) -> None:
        object_id = ids.object_id_for(spec.task_id, index)
        if error is not None:
            value = pb.ObjectValue(object_id=object_id, inline_data=pickle.dumps(error),
                                   is_error=True)
        else:
            value = self.core.store_value(object_id, serialized, local=False)
        self.core.send_task_result(pb.TaskResult(task_id=spec.task_id, returns=[value],
                                                 stream_item_id=object_id, stream_index=index))

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

    def _wrap(self, spec, exc: BaseException) -> exceptions.RayTaskError:
        if isinstance(exc, exceptions.RayTaskError):
            return exc
        return exceptions.RayTaskError(
            function_name=spec.name,
            traceback_str=traceback.format_exc(),
            cause=exc,
            pid=os.getpid(),
            ip=socket.gethostname(),
            task_id=spec.task_id.hex(),
        )

    @staticmethod
    def _retryable(spec, exc: BaseException) -> bool:
        if not spec.retry_exceptions:
            return False
        if not spec.retry_exception_types:
            return True
        return isinstance(exc, pickle.loads(spec.retry_exception_types))

    @staticmethod
    def _fail(result: pb.TaskResult, spec, error: BaseException, retryable: bool = False) -> None:
        del result.returns[:]
        result.failed = True
        result.retryable_error = retryable
        blob = pickle.dumps(error)
        outputs = 1 if spec.num_returns < 0 else spec.num_returns
        for index in range(outputs):
            object_id = (ids.object_id_for(spec.task_id, 0) if spec.num_returns < 0
                         else ids.object_id_for(spec.task_id, index + 1))
            result.returns.append(pb.ObjectValue(object_id=object_id, inline_data=blob,
                                                 is_error=True))
