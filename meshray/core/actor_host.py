"""The worker-side half of an actor: its instance, its server, its threads.

Callers stream method calls straight to this process (ActorService.Call).
How a call runs depends on the actor:
- a plain actor (max_concurrency=1, no async methods): on the main thread,
  one at a time, in arrival order;
- a threaded actor (max_concurrency=N) and each concurrency group: a pool of
  that many threads;
- an async actor (any `async def` method): coroutines on one event loop, at
  most max_concurrency (default 1000) at a time per group.

An actor created for another node refuses calls while its node's lease
fence is down (common/fence.py): that node may have restarted it elsewhere.
A refusal never leaves the caller guessing: the stream is ended only once
every call read before the refusal has been answered, with trailing
metadata (REFUSED_KEY) that tells the caller none of the unanswered calls
ran, so it sends them again rather than failing them as maybe executed.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import logging
import os
import pickle
import queue
import sys
import threading
import time
import weakref

import grpc

from meshray import exceptions
from meshray.common import ids
from meshray.common.fence import LeaseFence, fence_applies
from meshray.core import arg_files, call_rules, state as state_mod
from meshray.core.actor_client import REFUSED_KEY
from meshray.core.actor_task_events import ActorTaskRecorder
from meshray.core.object_ref import ArgPlaceholder
from meshray.core.options import resolve_max_concurrency
from meshray.rpc import accept_targets, make_server, strict
from meshray.rpc.rules import pickle_problem
from meshray.rpc.generated import meshray_pb2 as pb
from meshray.rpc.generated import meshray_pb2_grpc as pb_grpc

__all__ = ["ActorHost", "ActorExitRequested", "MalformedArguments"]

log = logging.getLogger(__name__)

_BATCH = 2000
TERMINATE_METHOD = "__ray_terminate__"
READY_METHOD = "__ray_ready__"


class MalformedArguments(strict.Malformed):
    """An actor call whose argument bytes no caller sends (ActorHost.load_args).

    TaskExecutor.run lets it through instead of making it the call's error:
    the actor ends the caller's stream with INVALID_ARGUMENT.
    """


class ActorExitRequested(BaseException):
    """Raised by exit_actor(): unwinds the method, then the actor exits.

    A BaseException, so that a method's own `except Exception` cannot swallow it.
    """


class _Refused:
    """Queued by the reader in place of a batch it refused: how many calls
    it had handed on before, which the stream answers before it ends, and why."""

    def __init__(self, dispatched: int, why: str):
        self.dispatched = dispatched
        self.why = why


class _CallStream:
    """The replies of one Call stream, and when it may end.

    A caller that half-closes its side still gets the answers to the calls it
    sent: the stream ends once every call it carried has been answered.
    """

    def __init__(self):
        self.replies: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._unanswered = 0
        self._input_ended = False

    def started(self) -> None:
        with self._lock:
            self._unanswered += 1

    def reply(self, item) -> None:
        self.replies.put(item)
        if is_stream_item(item):
            return          # one of a generator call's items: the call is not answered yet
        with self._lock:
            self._unanswered -= 1
            last = self._input_ended and self._unanswered == 0
        if last:
            self.replies.put(None)

    def input_ended(self) -> None:
        with self._lock:
            self._input_ended = True
            last = self._unanswered == 0
        if last:
            self.replies.put(None)


class ActorHost(pb_grpc.ActorServiceServicer):
    def __init__(self, executor, creation_spec, cls):
        self.executor = executor
        self.core = executor.core
        self.spec = creation_spec
        self._fence = LeaseFence.from_env()
        if self._fence is not None and not fence_applies(
                creation_spec.task_id, self.core.node_id, ids.NODE_PREFIX_LEN):
            # Created on this node: only this node restarts it, so no other
            # incarnation can answer beside this one while it runs.
            self._fence.close()
            self._fence = None
        # The lease it was created under: after the node re-registers, its
        # creator has replaced it or declared it dead.
        self._fence_lease = (self._fence.lease_id or None) if self._fence is not None else None
        self.cls = cls
        self.options = json.loads(creation_spec.actor_options or b"{}")
        self.actor_id = creation_spec.actor_id
        self.instance = None
        self.is_async = bool(self.options.get("is_async"))
        groups = dict(self.options.get("concurrency_groups") or {})
        self.max_concurrency = resolve_max_concurrency(self.options.get("max_concurrency"),
                                                       self.is_async)
        self._pools: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
        self._semaphores: dict[str, asyncio.Semaphore] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._groups = groups
        self._inline = not self.is_async and self.max_concurrency == 1 and not groups
        self._server = None
        self._streams: list[queue.SimpleQueue] = []
        self._exiting = False
        self._exit_reason = ""
        self._exit_restartable = False
        # Calls the caller cancelled before they started (answered
        # TaskCancelledError when their turn comes), and the asyncio tasks of
        # an async actor's calls, which a cancel cancels.
        self._cancelled_calls: set[bytes] = set()
        # Sync calls dispatched and not started (task id -> (spec, reply)): a
        # cancel answers them at once (dict pops are atomic across threads).
        self._waiting: dict[bytes, tuple] = {}
        self._async_calls: dict[bytes, asyncio.Task] = {}
        # Argument files mapped when their call arrived (task id -> image or
        # the error mapping raised), taken when the call runs.
        self._arg_images: dict = {}
        # Argument file name -> weak refs to this process's mappings of it:
        # a reply says the caller may reuse the file only once all are gone.
        self._arg_maps: dict = {}
        self._arg_maps_lock = threading.Lock()
        # Its method calls, reported to the node for the state API.
        self._task_events = ActorTaskRecorder(self.options.get("class_name") or cls.__name__,
                                              self.core.send_actor_task_events,
                                              enabled=os.environ.get("MESHRAY_TASK_EVENTS",
                                                                     "1") != "0")

    # ------------------------------------------------------------ setup
    def construct(self, args, kwargs) -> None:
        state_mod.state.actor_id = self.actor_id
        state_mod.state.actor_reconstructed = self.spec.attempt > 0
        state_mod.state.actor_strategy_blob = self.spec.strategy_blob
        state_mod.state.actor_spec = self.spec
        state_mod.state.actor_class_path = f"{self.cls.__module__}.{self.cls.__qualname__}"
        if self.is_async:
            self._loop = asyncio.new_event_loop()
            threading.Thread(target=self._loop.run_forever, name="meshray-actor-loop",
                             daemon=True).start()
            for group, limit in [("", self.max_concurrency), *self._groups.items()]:
                self._semaphores[group] = asyncio.Semaphore(limit)
        elif not self._inline:
            for group, limit in [("", self.max_concurrency), *self._groups.items()]:
                self._pools[group] = concurrent.futures.ThreadPoolExecutor(
                    max_workers=limit, thread_name_prefix=f"meshray-actor-{group or 'default'}")
        self.instance = self.cls(*args, **kwargs)

    def start_server(self) -> str:
        """Serve ActorService on a unix socket and a loopback/host TCP port."""
        session = self.core.session_dir or "/tmp"
        unix_path = os.path.join(session, f"actor-{self.actor_id.hex()[:12]}-{os.getpid()}.sock")
        host = os.environ.get("MESHRAY_NODE_HOST", "127.0.0.1")
        self._server, bound = make_server([f"{host}:0", f"unix:{unix_path}"],
                                          token=self.core.token,
                                          max_workers=256)
        methods = frozenset(self.options.get("methods") or ()) | {READY_METHOD, TERMINATE_METHOD}
        # A malformed call batch is answered INVALID_ARGUMENT and never dispatched.
        strict.add_service(self._server, self, "meshray.ActorService", checks={
            "Call": lambda batch: call_rules.check_actor_call_batch(batch, self.actor_id, methods)})
        self._server.start()
        advertise = os.environ.get("MESHRAY_ADVERTISE_HOST") or host
        addresses = [a if a.startswith("unix:") else f"{advertise}:{a.rsplit(':', 1)[1]}"
                     for a in bound]
        accept_targets(self._server, addresses)   # callers dial what we advertise
        return ",".join(addresses)

    # ------------------------------------------------------------ stream
    def Call(self, request_iterator, context):
        stream = _CallStream()
        replies = stream.replies
        self._streams.append(replies)
        reader = threading.Thread(target=self._read_calls, args=(request_iterator, stream),
                                  name="meshray-actor-calls", daemon=True)
        reader.start()
        answered = 0
        refused: _Refused | None = None
        try:
            while True:
                if refused is not None and answered >= refused.dispatched:
                    context.set_trailing_metadata(((REFUSED_KEY, "1"),))
                    context.abort(grpc.StatusCode.UNAVAILABLE,
                                  f"actor {self.actor_id.hex()}: {refused.why}")
                result = replies.get()
                if result is None:
                    return
                if isinstance(result, _Refused):
                    refused = result
                    continue
                if isinstance(result, strict.Malformed):
                    raise result           # strict.py answers INVALID_ARGUMENT
                results = [result]
                while len(results) < _BATCH:
                    try:
                        result = replies.get_nowait()
                    except queue.Empty:
                        break
                    if isinstance(result, _Refused):
                        refused = result
                        break
                    if not isinstance(result, pb.TaskResult):     # the end, or malformed
                        self._answered(results)
                        yield pb.ActorReplyBatch(results=results)
                        if result is None:
                            return
                        raise result           # strict.py answers INVALID_ARGUMENT
                    results.append(result)
                answered += self._answered(results)
                yield pb.ActorReplyBatch(results=results)
        finally:
            self._streams.remove(replies)

    def _answered(self, results: list) -> int:
        """Record the calls `results` answer (not mere stream items); how many."""
        answers = [result for result in results if not is_stream_item(result)]
        self._task_events.answered(answers)
        return len(answers)

    def _read_calls(self, request_iterator, stream: "_CallStream") -> None:
        dispatched = 0
        try:
            for batch in request_iterator:
                if self._fence is not None and not self._fence.valid(self._fence_lease):
                    # Never run calls as an incarnation the cluster may have given up on.
                    stream.replies.put(_Refused(dispatched, (
                        "its node's etcd lease has lapsed, so its creator may have restarted "
                        "it elsewhere; calls are refused (not run) until the node is a member "
                        "again")))
                    return
                if self._exiting and self._exit_restartable:
                    # Not run here: the caller sends them to the restarted actor.
                    stream.replies.put(_Refused(dispatched, (
                        f"it is exiting to be restarted ({self._exit_reason}); calls sent "
                        "from now on are refused (not run)")))
                    return
                self._task_events.received(batch.calls)
                for spec in batch.calls:
                    dispatched += 1
                    stream.started()
                    self._dispatch(spec, stream.reply)
                for task_id in batch.cancel_task_ids:
                    self.cancel_call(task_id)
        except Exception as exc:  # noqa: BLE001 - the caller went away, or sent garbage
            log.debug("actor call stream ended: %s", exc)
            stream.replies.put(None)
            return
        stream.input_ended()

    def _refuse(self, spec) -> pb.TaskResult:
        result = pb.TaskResult(task_id=spec.task_id)
        self.executor.fail(result, spec, exceptions.ActorDiedError(
            actor_id=self.actor_id.hex(), class_name=self.options.get("class_name"),
            error_message=self._exit_reason))
        return result

    def _dispatch(self, spec, reply) -> None:
        if self._exiting:
            reply(self._refuse(spec))
            return
        if spec.args_file:
            # Map now, off the thread that runs calls, and while the caller
            # surely still holds the file (it removes it only once answered,
            # or the node does once the caller is gone).
            try:
                self._arg_images[spec.task_id] = self._map_arg_file(spec.args_file)
            except Exception as exc:  # noqa: BLE001 - reported when the call runs
                self._arg_images[spec.task_id] = exc
        if self._inline or spec.method_name == TERMINATE_METHOD:
            # In order on the main thread (terminate waits behind queued calls).
            self._waiting[spec.task_id] = (spec, reply)
            self.executor.enqueue_call(spec, reply)
        elif self.is_async:
            asyncio.run_coroutine_threadsafe(self._run_async(spec, reply), self._loop)
        else:
            pool = self._pools.get(spec.concurrency_group) or self._pools[""]
            self._waiting[spec.task_id] = (spec, reply)
            pool.submit(self.run_call, spec, reply)

    # ------------------------------------------------------------ running
    def _method(self, spec):
        name = spec.method_name
        if name == READY_METHOD:
            return lambda: None
        return getattr(self.instance, name)

    def _map_arg_file(self, name: str) -> tuple:
        image = arg_files.map_file(self.core.store_dir, name)
        try:
            ref = weakref.ref(image[0].obj)   # the mapping: every view keeps it alive
        except TypeError:
            ref = lambda: True   # noqa: E731 - cannot tell when it goes: never "released"
        with self._arg_maps_lock:
            self._arg_maps.setdefault(name, []).append(ref)
        return image

    def _arg_file_released(self, name: str) -> bool:
        """True if nothing in this process maps the argument file any more."""
        with self._arg_maps_lock:
            refs = self._arg_maps.get(name)
            if refs is None:
                return False
            refs[:] = [ref for ref in refs if ref() is not None]
            if refs:
                return False
            del self._arg_maps[name]
            return True

    def load_args(self, spec):
        """The call's (args, kwargs) as sent, with placeholders for ref arguments.

        Bytes that are not a pickle, or a pickle of anything but an (args,
        kwargs) pair, make the call malformed (MalformedArguments: its stream is
        answered INVALID_ARGUMENT); an error raised while rebuilding the
        caller's objects is the call's own error, as for a task.
        """
        what = f"calls[].args_blob of call {spec.task_id.hex()} ({spec.method_name})"
        if not spec.args_image:
            inband, buffers = spec.args_blob, ()
        elif spec.args_file:
            image = self._arg_images.pop(spec.task_id, None)
            if image is None:   # e.g. a resent call that arrived twice
                image = self._map_arg_file(spec.args_file)
            elif isinstance(image, BaseException):
                raise exceptions.RaySystemError(
                    f"could not read the arguments of {spec.name} from the caller's argument "
                    f"file {spec.args_file!r}: {image}")
            inband, buffers = image
        else:
            try:
                inband, buffers = arg_files.unpack_inline(spec.args_blob)
            except ValueError as exc:
                raise MalformedArguments(f"{what}: not an object image ({exc})") from None
        problem = pickle_problem(inband)
        if problem is not None:
            raise MalformedArguments(f"{what}: expected {problem}")
        try:
            loaded = pickle.loads(inband, buffers=buffers)
        except (pickle.UnpicklingError, EOFError) as exc:
            raise MalformedArguments(
                f"{what}: not a pickle ({type(exc).__name__}: {exc})") from None
        if not (isinstance(loaded, tuple) and len(loaded) == 2
                and isinstance(loaded[0], (list, tuple)) and isinstance(loaded[1], dict)):
            raise MalformedArguments(f"{what}: expected a pickled (args, kwargs) pair, "
                                     f"got a {type(loaded).__name__}")
        return loaded

    def resolve_args(self, spec, values: list):
        """Rebuild a call's (args, kwargs): a plain pickle, or an image (inline or a file)."""
        args, kwargs = self.load_args(spec)

        def fill(item):
            return values[item.index] if isinstance(item, ArgPlaceholder) else item

        return [fill(a) for a in args], {k: fill(v) for k, v in kwargs.items()}

    def run_call(self, spec, reply) -> None:
        """Run one call synchronously (main thread or a pool thread)."""
        if self._waiting.pop(spec.task_id, None) is None:
            return        # cancelled while it waited: answered already (cancel_call)
        if self._exiting:
            self._arg_images.pop(spec.task_id, None)
            reply(self._refuse(spec))
            return
        if spec.method_name == TERMINATE_METHOD:
            reply(self._terminate(spec))
            return
        if spec.task_id in self._cancelled_calls:
            self._cancelled_calls.discard(spec.task_id)
            self._arg_images.pop(spec.task_id, None)
            reply(self._cancelled(spec))
            return

        def body():
            values = self.executor.fetch_arg_values(spec)
            args, kwargs = self.resolve_args(spec, values)
            return self._method(spec)(*args, **kwargs)

        try:
            self._guarded(spec, body, reply)
        finally:
            if spec.args_file:
                self._arg_images.pop(spec.task_id, None)   # failed before its args were read

    def _deliver(self, reply, spec=None):
        def deliver(result: pb.TaskResult) -> None:
            if spec is not None and spec.args_file:
                # The call's arguments are gone unless it kept one (stored it,
                # returned it): then the caller must not overwrite the file.
                result.args_released = self._arg_file_released(spec.args_file)
            # Values the node must track (stored, or holding refs) are held
            # for us by the node until the caller registers them.
            for value in result.returns:
                if value.in_store:
                    value.location = self.core.node_id.hex()   # callers may be elsewhere
                if value.in_store or value.contained_ids:
                    self.core.send_handoff(value)
            reply(result)
        return deliver

    def _guarded(self, spec, body, reply) -> None:
        try:
            self.executor.run(spec, body, self._deliver(reply, spec),
                              send_item=self._deliver(reply))
        except ActorExitRequested:
            reply(self._exit_now(spec, "exit_actor() was called"))
        except SystemExit as exc:
            code, restartable = exit_status(exc)
            reply(self._exit_now(spec, f"the actor's method {spec.name} called sys.exit(): the "
                                       f"worker exits with code {exc.code!r}",
                                 restartable=restartable, code=code))
        except MalformedArguments as exc:
            reply(exc)   # Call ends the caller's stream with INVALID_ARGUMENT

    async def _run_async(self, spec, reply) -> None:
        """Run one call of an async actor as its own asyncio task (cancel_call cancels it)."""
        task = asyncio.current_task()
        self._async_calls[spec.task_id] = task
        if spec.task_id in self._cancelled_calls:
            task.cancel()     # cancelled before it got here: it ends at its first await
        try:
            semaphore = self._semaphores.get(spec.concurrency_group) or self._semaphores[""]
            async with semaphore:
                body = await self._prepare_async(spec, reply)
                self._guarded(spec, body, reply)
                return
        except asyncio.CancelledError:
            # Cancelled while it waited for its turn or for its arguments.
            if spec.args_file:
                self._arg_images.pop(spec.task_id, None)
            reply(self._cancelled(spec))
        finally:
            self._async_calls.pop(spec.task_id, None)
            self._cancelled_calls.discard(spec.task_id)

    async def _stream_async(self, spec, generator, reply):
        """Send an async generator's items as it yields them (on this loop);
        what `_guarded` then runs gives the call's outcome."""
        state_mod.set_current_spec(spec)
        if spec.num_returns >= 0:
            # num_returns=N or "dynamic": the values are stored once all exist.
            items = []
            try:
                async for item in generator:
                    items.append(item)
            except Exception as exc:  # noqa: BLE001 - raised where a sync generator's would be
                error = exc
                return lambda: _raising_after(items, error)
            except BaseException as exc:  # noqa: BLE001 - a cancel or exit: packaged by _guarded
                return _raiser(exc)
            return lambda: iter(items)
        sink = self.executor.item_sink(spec, self._deliver(reply))
        try:
            async for item in generator:
                sink.send(item)
        except (asyncio.CancelledError, ActorExitRequested, SystemExit) as exc:
            return _raiser(exc)
        except Exception as exc:  # noqa: BLE001 - the error is the stream's last item
            sink.fail(self.executor.wrap(spec, exc))
        return lambda: sink

    async def _prepare_async(self, spec, reply):
        """What `_guarded` runs for an async call: the awaited outcome of a
        coroutine method, or a plain method to call."""
        loop = asyncio.get_running_loop()
        try:
            values = await loop.run_in_executor(None, self.executor.fetch_arg_values, spec)
            method = self._method(spec)
            args, kwargs = self.resolve_args(spec, values)
        except Exception as exc:  # noqa: BLE001 - reported as the call's result
            if spec.args_file:
                self._arg_images.pop(spec.task_id, None)
            return _raiser(exc)
        if inspect.isasyncgenfunction(method):
            return await self._stream_async(spec, method(*args, **kwargs), reply)
        if not inspect.iscoroutinefunction(method):
            return lambda: method(*args, **kwargs)
        # This asyncio task's own context: the coroutine sees its call's spec.
        state_mod.set_current_spec(spec)
        try:
            output = await method(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - packaged by _guarded (a cancel included)
            return _raiser(exc)
        return lambda: output

    # ------------------------------------------------------------ cancels
    def cancel_call(self, task_id: bytes) -> None:
        """The caller cancelled this call (meshray.cancel on its ref).

        As in Ray: a call that has not started is answered TaskCancelledError
        and never runs; a running call of an async actor has its asyncio task
        cancelled (the coroutine sees CancelledError at its await); a running
        call of a plain or threaded actor is not interrupted (actors have
        state): it is flagged, so `get_runtime_context().is_canceled()` says
        True inside it, and unless it ends early its result stands.
        """
        task = self._async_calls.get(task_id)
        if task is not None:
            self._loop.call_soon_threadsafe(task.cancel)
            return
        waiting = self._waiting.pop(task_id, None)
        if waiting is not None:
            # Queued behind other calls: answered now, skipped when its turn comes.
            spec, reply = waiting
            self._arg_images.pop(task_id, None)
            reply(self._cancelled(spec))
            return
        if self.executor.flag_cancelled(task_id):
            # A running generator call stops at its next yield; any other
            # runs to its end (its result stands) and sees is_canceled().
            return
        if len(self._cancelled_calls) > 10_000:
            self._cancelled_calls.clear()   # ids of calls that had already finished
        self._cancelled_calls.add(task_id)
        if self.is_async:
            # Its task may have started in between: cancel it once it exists.
            self._loop.call_soon_threadsafe(self._cancel_async, task_id)

    def _cancel_async(self, task_id: bytes) -> None:
        task = self._async_calls.get(task_id)
        if task is not None:
            task.cancel()

    def _cancelled(self, spec) -> pb.TaskResult:
        result = pb.TaskResult(task_id=spec.task_id)
        self.executor.fail(result, spec, exceptions.TaskCancelledError(spec.task_id.hex()))
        return result

    # ------------------------------------------------------------ exits
    def _terminate(self, spec) -> pb.TaskResult:
        return self._exit_now(spec, "the actor was terminated with __ray_terminate__")

    def _exit_now(self, spec, reason: str, *, restartable: bool = False,
                  code: int = 0) -> pb.TaskResult:
        """Tell the node why the actor exits, answer the call, then exit.

        An intended exit (exit_actor(), sys.exit(0), __ray_terminate__) is
        never restarted; a restartable one is restarted as a crash would be
        if max_restarts allows. Either way every call not yet run is answered
        ActorDiedError with `reason`, rather than left to a broken stream.
        """
        self._exit_restartable = restartable
        self._exiting = True
        self._exit_reason = reason
        self.core.send_actor_exiting(self.actor_id, reason, restartable)
        result = pb.TaskResult(task_id=spec.task_id)
        self.executor.fail(result, spec, exceptions.ActorDiedError(
            actor_id=self.actor_id.hex(), class_name=self.options.get("class_name"),
            error_message=reason))
        threading.Thread(target=self._exit_soon, args=(code,), daemon=True).start()
        return result

    def _exit_soon(self, code: int = 0) -> None:
        # Let the reply and the node message leave before the process ends.
        deadline = time.monotonic() + 2.0
        time.sleep(0.02)
        while time.monotonic() < deadline and not (
                self.core.outbox_empty() and all(q.empty() for q in list(self._streams))):
            time.sleep(0.01)
        time.sleep(0.1)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def exit_status(exc: SystemExit) -> tuple[int, bool]:
    """(process exit code, restartable) for a SystemExit out of an actor method.

    As in Ray, only code 0 is an intended exit; sys.exit() (code None), a
    non-zero code or a message is a failure, restarted if max_restarts allows.
    """
    code = exc.code
    if code == 0:
        return 0, False
    if isinstance(code, int) and not isinstance(code, bool) and 0 < code < 256:
        return code, True
    return 1, True


def _raiser(error: BaseException):
    def body():
        raise error
    return body


def _raising_after(items: list, error: BaseException):
    """A generator giving `items`, then raising `error` (an async generator that failed)."""
    yield from items
    raise error


def is_stream_item(reply) -> bool:
    """Whether a reply is one item of a generator call rather than its answer."""
    return isinstance(reply, pb.TaskResult) and bool(reply.stream_item_id)
