"""The worker-side half of an actor: its instance, its server, its threads.

Callers send method calls straight to this process, on a call link
(rpc/call_link.py) each.
How a call runs depends on the actor:
- a plain actor (max_concurrency=1, no async methods): on the main thread,
  one at a time, in arrival order;
- a threaded actor (max_concurrency=N) and each concurrency group: a pool of
  that many threads;
- an async actor (any `async def` method): coroutines on one event loop, at
  most max_concurrency (default 1000) at a time per group.

An actor created for another node refuses calls while its node's lease
fence is down (common/fence.py): that node may have restarted it elsewhere.
A refusal never leaves the caller guessing: the link is ended only once
every call read before the refusal has been answered, with a status that
says none of the unanswered calls ran, so the caller sends them again
rather than failing them as maybe executed.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import logging
import os
import pickle
import sys
import threading
import time
import weakref

from meshray import exceptions
from meshray.common import ids
from meshray.common.fence import LeaseFence, fence_applies
from meshray.core import arg_files, call_rules, state as state_mod
from meshray.core.actor_task_events import ActorTaskRecorder
from meshray.core.object_ref import ArgPlaceholder
from meshray.core.options import resolve_max_concurrency
from meshray.rpc import call_link, strict
from meshray.rpc.call_link import CALL_METHOD, LinkClosed, LinkServer, status_payload
from meshray.rpc.rules import pickle_problem
from meshray.rpc.generated import meshray_pb2 as pb

__all__ = ["ActorHost", "ActorExitRequested", "CallStream", "MalformedArguments"]

log = logging.getLogger(__name__)

TERMINATE_METHOD = "__ray_terminate__"
_FINAL_WRITE_S = 5.0      # how long a link's last answers and status may take to leave
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


class CallStream:
    """The answers on one call link, and when the link may end.

    Each answer is written from the thread that produced it (call_link
    combines answers that leave at once). The link ends with its status
    only once every call read from it has been answered: a caller that
    sent END, or was refused, still gets the answers to the calls it sent.
    """

    def __init__(self, link, answered):
        self.link = link
        self._answered = answered           # records answers for the state API
        self._lock = threading.Lock()
        self._unanswered = 0
        self._final: bytes | None = None    # the status, once the input ended
        self.drop_reply = False             # chaos: break the link at the next answer
        self._finishing = False
        self.done = threading.Event()       # the status is written (or the link broke)

    def started(self) -> None:
        with self._lock:
            self._unanswered += 1

    def reply(self, item) -> None:
        if isinstance(item, strict.Malformed):     # MalformedArguments of one call
            self.finish_now(call_link.MALFORMED, f"malformed request to {CALL_METHOD}: {item}")
            return
        if self.drop_reply:
            self.finish_now(call_link.UNAVAILABLE, "failpoint actor.call: dropped a reply")
            return
        item_only = is_stream_item(item)
        if not item_only:
            self._answered([item])
        with self._lock:
            # The only call out on this link: its caller is waiting for this
            # answer, so it is written now; in a burst the link's writer
            # sends what gathers in one write.
            alone = self._unanswered <= 1
        try:
            self.link.send(call_link.REPLIES, pb.ActorReplyBatch(results=[item]).SerializeToString(),
                           now=alone)
        except LinkClosed as exc:
            log.debug("an answer could not be sent: %s", exc)     # the caller is gone
        if item_only:
            return          # one of a generator call's items: the call is not answered yet
        with self._lock:
            self._unanswered -= 1
            last = self._final is not None and self._unanswered == 0
        if last:
            self._send_final()

    def end(self, status: bytes) -> None:
        """No more calls will be read: `status` goes once all are answered."""
        with self._lock:
            if self._final is None:
                self._final = status
            last = self._unanswered == 0
        if last:
            self._send_final()

    def finish_now(self, code: int, details: str) -> None:
        """End the link at once with `code` (its unanswered calls are lost):
        the status, then end of input for the caller, which then closes."""
        with self._lock:
            self._final = status_payload(code, details)
            self._unanswered = 0
        self._send_final()
        self.link.shutdown_write()

    def broken(self) -> None:
        self.done.set()

    def batches(self, method: str, check, malformed_log, roll=None):
        """The caller's call batches, decoded and checked, until the link ends:
        END (the status OK follows once every call read is answered), a break
        (its answers have nowhere to go), a malformed batch (INVALID_ARGUMENT,
        logged as a request to `method`) or -- with `roll`, a chaos failpoint
        -- a dropped request. Whoever stops early ends the link itself."""
        link = self.link
        while True:
            try:
                kind, payload = link.recv()
            except LinkClosed as exc:
                log.debug("call link ended: %s", exc)
                self.broken()
                return
            if self.done.is_set():
                return            # ended already (a call's arguments were malformed)
            fired = roll() if roll is not None else None
            if fired and fired[0] == "drop":
                self.finish_now(call_link.UNAVAILABLE,
                                "failpoint actor.call: dropped a request message")
                return
            if fired:
                self.drop_reply = True
            if kind == call_link.END:
                self.end(status_payload(call_link.OK))
                return
            try:
                batch = call_link.decode_calls(kind, payload, pb.ActorCallBatch, check)
            except strict.Malformed as exc:
                malformed_log.record(method, link.peer, str(exc))
                self.finish_now(call_link.MALFORMED, f"malformed request to {method}: {exc}")
                return
            yield batch

    def _send_final(self) -> None:
        with self._lock:
            if self._finishing:
                return
            self._finishing = True
            final = self._final
        try:
            self.link.send(call_link.STATUS, final)
            self.link.wait_idle(_FINAL_WRITE_S)
        except LinkClosed as exc:
            log.debug("a link's status could not be sent: %s", exc)
        self.done.set()


class ActorHost:
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
        self._server: LinkServer | None = None
        self._links: list[CallStream] = []
        self._malformed_log = strict.MalformedLog()
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
        """Serve call links on a unix socket and a loopback/host TCP port."""
        session = self.core.session_dir or "/tmp"
        unix_path = os.path.join(session, f"actor-{self.actor_id.hex()[:12]}-{os.getpid()}.sock")
        host = os.environ.get("MESHRAY_NODE_HOST", "127.0.0.1")
        methods = frozenset(self.options.get("methods") or ()) | {READY_METHOD, TERMINATE_METHOD}
        self._check = lambda batch: call_rules.check_actor_call_batch(batch, self.actor_id,
                                                                      methods)
        self._server = LinkServer([f"{host}:0", f"unix:{unix_path}"], token=self.core.token,
                                  on_link=self._serve_link)
        advertise = os.environ.get("MESHRAY_ADVERTISE_HOST") or host
        addresses = [a if a.startswith("unix:") else f"{advertise}:{a.rsplit(':', 1)[1]}"
                     for a in self._server.addresses]
        self._server.accept_targets(addresses)   # callers dial what we advertise
        return ",".join(addresses)

    # ------------------------------------------------------------ links
    def _serve_link(self, link) -> None:
        """One caller's link, on its own thread: read calls until the caller
        ends (or is refused), then wait until every call read is answered."""
        stream = CallStream(link, self._answered)
        self._links.append(stream)
        try:
            self._read_calls(link, stream)
            stream.done.wait()
            link.drain(_FINAL_WRITE_S)
        finally:
            self._links.remove(stream)

    def _answered(self, results: list) -> None:
        self._task_events.answered(results)

    def _read_calls(self, link, stream: CallStream) -> None:
        for batch in stream.batches(CALL_METHOD, self._check, self._malformed_log,
                                    roll=self._server.roll):
            if self._fence is not None and not self._fence.valid(self._fence_lease):
                # Never run calls as an incarnation the cluster may have given up on.
                stream.end(status_payload(call_link.UNAVAILABLE, (
                    f"actor {self.actor_id.hex()}: its node's etcd lease has lapsed, so its "
                    "creator may have restarted it elsewhere; calls are refused (not run) "
                    "until the node is a member again"), refused=True))
                return
            if self._exiting and self._exit_restartable:
                # Not run here: the caller sends them to the restarted actor.
                stream.end(status_payload(call_link.UNAVAILABLE, (
                    f"actor {self.actor_id.hex()}: it is exiting to be restarted "
                    f"({self._exit_reason}); calls sent from now on are refused (not run)"),
                    refused=True))
                return
            self._task_events.received(batch.calls)
            for spec in batch.calls:
                stream.started()
                self._dispatch(spec, stream.reply)
            for task_id in batch.cancel_task_ids:
                self.cancel_call(task_id)

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
            reply(exc)   # the link ends with INVALID_ARGUMENT (CallStream.reply)

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
                self.core.outbox_empty() and all(s.link.idle() for s in list(self._links))):
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
