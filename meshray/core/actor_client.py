"""The caller-side half of actors: one direct call link per (process, actor).

Calls are numbered and sent in submission order on the link
(rpc/call_link.py), written by the thread that submits them (or by one
submitting at the same moment, which writes both), so calls from
one process run in that order on a synchronous actor. The actor's address
comes from the caller's node (which asks etcd when the actor lives
elsewhere) once per incarnation; after that, calls never touch the node or
etcd. When the link breaks, the connection asks the node what happened:
a restarted actor gets the unanswered calls again if they may be retried
(max_task_retries), a dead one fails them with ActorDiedError.

Errors tell what is known about each call. A call that provably never
reached the actor -- still queued here when the link ended, or refused by
an actor whose node's lease fence is down (actor_host.py ends such a link
only after answering every call it accepted) -- did not run: it is sent
again without using a retry, and if it must fail its error says it did not
run. Only a call that left this process and went unanswered "may or may not
have been executed". Failing to look the actor up (the node, or etcd behind
it, does not answer) is not evidence of anything: the lookup is retried,
and calls fail only after DELIVERY_TIMEOUT_S without any way to the actor.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from meshray import exceptions
from meshray.core import arg_files
from meshray.rpc import call_link
from meshray.rpc.call_link import LinkClosed
from meshray.rpc.generated import meshray_pb2 as pb

__all__ = ["ActorConnection", "maybe_delivered", "stream_refused"]

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT_S = 60.0
# How long a call may wait while its actor cannot be reached at all (the
# lookup fails, or every stream breaks or is refused before any answer).
DELIVERY_TIMEOUT_S = 60.0
# A stream broke with calls out, and the node still names the same address:
# the worker may have just died (its connections close a moment before the
# node can see it exited). Ask again for this long before concluding the
# actor lives and the calls out were lost in the network.
SAME_ADDRESS_GRACE_S = 2.0
_NOT_DELIVERED = "This call was never delivered to the actor, so it did not run."


@dataclass(eq=False)
class PendingCall:
    spec: object
    return_ids: list
    keepalive: list
    retries_left: int
    # On the current link, or sent on an earlier one and maybe delivered.
    sent: bool = False
    queued_at: float = field(default_factory=time.monotonic)
    extra: dict = field(default_factory=dict)
    arg_file: str = ""        # this call's argument file (arg_files), released when it is over
    resent: bool = False      # sent more than once: an earlier recipient may still map arg_file
    cancelled: bool = False   # meshray.cancel asked for it: never sent again
    frame: int = 0            # its frame on the current link (Link.sent_upto says if it left)


class ActorConnection:
    def __init__(self, core, actor_id: bytes, *, max_task_retries: int = 0,
                 class_name: str = ""):
        self._core = core
        self.actor_id = actor_id
        self.class_name = class_name
        self.max_task_retries = max_task_retries
        self._lock = threading.Lock()
        self._pending: "OrderedDict[bytes, PendingCall]" = OrderedDict()
        self._link: call_link.Link | None = None     # to the current incarnation
        self._thread: threading.Thread | None = None
        self._dead: BaseException | None = None
        self._closed = False
        self._sequence = 0
        # Whether the current incarnation lives on this node (None: not
        # located yet); large arguments use files only for a local actor.
        self.same_node: bool | None = None

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def submit(self, spec, return_ids: list, keepalive: list, max_task_retries: int,
               arg_file: str = "") -> None:
        with self._lock:
            if self._dead is not None:
                self._release(arg_file)
                self._core.fail_locally(return_ids, self._dead)
                return
            self._sequence += 1
            spec.sequence = self._sequence
            call = PendingCall(spec, return_ids, keepalive, max_task_retries, arg_file=arg_file)
            self._pending[spec.task_id] = call
            link = self._link
            if link is not None:
                self._enqueue(link, call)
            # A call with none before it waits alone: written now, from this
            # thread; in a burst the link's writer sends them in batches.
            alone = len(self._pending) <= 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name=f"meshray-actor-{self.actor_id.hex()[:8]}")
                self._thread.start()
        if link is not None and call.sent:
            self._flush(link, now=alone)

    def has_call(self, task_id: bytes) -> bool:
        """Whether the call `task_id` was submitted here and is not answered yet."""
        return task_id in self._pending

    def cancel(self, task_id: bytes) -> None:
        """Cancel a call: one not sent yet fails here with TaskCancelledError;
        a sent one is cancelled by its actor (ActorHost.cancel_call), which
        answers it."""
        with self._lock:
            call = self._pending.get(task_id)
            if call is None or call.cancelled:
                return
            call.cancelled = True
            link = self._link
            if call.sent and link is not None:
                try:
                    link.enqueue(call_link.CALLS, pb.ActorCallBatch(
                        cancel_task_ids=[task_id]).SerializeToString())
                except LinkClosed:
                    pass      # it fails below when the actor is found again
            elif call.sent:
                return      # its link broke: it fails below when the actor is found again
            else:
                del self._pending[task_id]
        if call.sent:
            if link is not None:
                self._flush(link)
            return
        self._release(call.arg_file)
        self._core.fail_locally(call.return_ids, exceptions.TaskCancelledError(task_id.hex()))

    def close(self) -> None:
        self._closed = True
        with self._lock:
            link = self._link
            files = [call.arg_file for call in self._pending.values() if call.arg_file]
        if link is not None:
            link.shutdown()
        # This process will not hear the answers any more: its argument files
        # are of no further use (an actor that already mapped one keeps it).
        for name in files:
            self._release(name)
        if self._core.store_dir:
            arg_files.drop_pool(self._core.store_dir, self._core.worker_id)

    def join(self, deadline: float) -> None:
        """Wait until `deadline` (monotonic) for the connection's thread to
        end after close(): a daemon thread stopped by the interpreter's exit
        inside its stream can hang the exit (CoreWorker._join_stream_threads)."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))

    def _release(self, name: str, reusable: bool = False) -> None:
        if name:
            try:
                arg_files.release(self._core.store_dir, self._core.worker_id, name,
                                  reusable=reusable)
            except OSError as exc:  # never fail a call over cleanup
                log.debug("could not remove argument file %s: %s", name, exc)

    # ------------------------------------------------------------ thread
    def _run(self) -> None:
        fruitless = 0
        unreachable_since = None   # since when no way to the actor has worked
        broken = None              # (address, when) of a stream that broke with calls out
        while not self._closed:
            if fruitless:
                # The address we were given failed at once (its worker died
                # and the node has not noticed yet, the network blipped, or
                # the actor refuses calls for now): back off before asking again.
                time.sleep(min(0.02 * 2 ** fruitless, 1.0))
            asked = time.monotonic()
            try:
                # The node answers once the actor is ALIVE with a live worker
                # (or DEAD), so a restart is waited for, not raced.
                info = self._core.request("actor_info", {
                    "actor_id": self.actor_id.hex(), "wait": True,
                    "timeout": RESOLVE_TIMEOUT_S}, timeout=RESOLVE_TIMEOUT_S + 10)
            except Exception as exc:  # noqa: BLE001 - the node (or etcd behind it) failed
                if self._closed:
                    return
                # Proves nothing about the actor: ask again until the deadline.
                unreachable_since = unreachable_since or asked
                self._fail_overdue(f"could not look up the actor: {exc}", unreachable_since,
                                   now_all=getattr(self._core, "_lost", False))
                fruitless = min(fruitless + 1, 6)
                continue
            state = info.get("state")
            if state in ("DEAD", "UNKNOWN"):
                cause = info.get("death_cause") or (
                    "the actor is unknown to the cluster" if state == "UNKNOWN" else "")
                self._fail_dead(info, cause)
                return
            if state != "ALIVE":
                unreachable_since = None   # it is being restarted: that is waited for
                continue
            if broken is not None and info.get("address") == broken[0] \
                    and time.monotonic() - broken[1] < SAME_ADDRESS_GRACE_S:
                fruitless = min(fruitless + 1, 6)
                continue
            broken = None
            started = time.monotonic()
            answered, why = self._serve(info)
            with self._lock:
                calls_out = any(call.sent for call in self._pending.values())
            if calls_out:
                broken = (info.get("address"), time.monotonic())
            if answered:
                fruitless, unreachable_since = 0, None
                continue
            fruitless = min(fruitless + 1, 6)
            unreachable_since = unreachable_since or started
            self._fail_overdue(why, unreachable_since)

    def _serve(self, info: dict) -> tuple[bool, str]:
        """Send calls to the incarnation `info` names and read its answers.

        Returns whether any answer came back, and why the link ended.
        """
        address = self._pick_address(info)
        try:
            link = call_link.connect(address, token=self._core.token)
        except LinkClosed as exc:
            return False, exc.details
        answered = False
        why = "its link ended"
        refused = False
        malformed = None
        same_node = info.get("node_id") == self._core.node_id.hex()
        with self._lock:
            self.same_node = same_node
            lost = [call for call in self._pending.values() if call.sent]
            for call in [call for call in self._pending.values() if call.cancelled]:
                # Cancelled, and the link that carried the cancel is gone.
                self._pending.pop(call.spec.task_id)
                self._release(call.arg_file)
                self._core.fail_locally(call.return_ids,
                                        exceptions.TaskCancelledError(call.spec.task_id.hex()))
            lost = [call for call in lost if not call.cancelled]
            for call in lost:
                # Sent on an earlier link that broke, and never answered: it
                # may have run. Retry only if the caller allowed it.
                if call.retries_left == 0:
                    self._pending.pop(call.spec.task_id)
                    self._release(call.arg_file)
                    self._core.fail_locally(call.return_ids, exceptions.ActorUnavailableError(
                        "the connection to the actor broke after this call was sent to it "
                        "(the actor may have died or restarted, or the network failed); "
                        "max_task_retries=0 means it is not retried", self.actor_id.hex()))
                elif call.retries_left > 0:
                    call.retries_left -= 1
            for call in self._pending.values():
                if call.sent:
                    call.resent = True
                if call.arg_file and not same_node:
                    self._inline_arg_file(call)
                self._enqueue(link, call)
            self._link = link
        try:
            self._flush(link)
            while (payload := link.recv_reply()) is not None:
                answered = True
                for result in pb.ActorReplyBatch.FromString(payload).results:
                    if result.stream_item_id:
                        # One item of a generator call: the call goes on.
                        self._core.deliver_stream_item(result)
                        continue
                    with self._lock:
                        call = self._pending.pop(result.task_id, None)
                    if call is not None:
                        self._core.deliver_actor_result(result)
                        if call.arg_file:
                            self._release(call.arg_file,
                                          reusable=result.args_released and not call.resent)
        except Exception as exc:  # noqa: BLE001 - link broke: find out why
            log.debug("actor %s link ended: %s", self.actor_id.hex(), exc)
            if isinstance(exc, LinkClosed) and exc.code == call_link.MALFORMED:
                malformed = exc.details
            refused = stream_refused(exc)
            why = getattr(exc, "details", None) or str(exc) or why
        finally:
            with self._lock:
                if self._link is link:
                    self._link = None
                link.shutdown()           # nothing more is queued on it
                for call in self._pending.values():
                    if call.sent and not maybe_delivered(call.frame <= link.sent_upto, refused):
                        call.sent = False    # it never reached the actor: just send it again
            link.close()
        if malformed is not None:
            # Sent again, a malformed call would be refused again: fail what
            # the link carried instead of retrying it.
            log.error("actor %s refused a call from this process as malformed: %s",
                      self.actor_id.hex(), malformed)
            self._fail_sent(exceptions.RaySystemError(
                f"actor {self.actor_id.hex()} refused a call as malformed: {malformed}"))
            return True, why
        return answered, why

    def _enqueue(self, link, call: PendingCall) -> None:
        """Queue `call` on `link` (the caller holds the lock)."""
        try:
            call.frame = link.enqueue(call_link.CALLS,
                                      pb.ActorCallBatch(calls=[call.spec]).SerializeToString())
        except LinkClosed:
            call.sent = False    # the reading thread finds the link over and sends it again
            return
        call.sent = True

    def _flush(self, link, now: bool = True) -> None:
        try:
            link.flush(now)
        except LinkClosed as exc:
            # The reading thread sees the break and sorts the calls out.
            log.debug("actor %s: sending calls failed: %s", self.actor_id.hex(), exc)

    def _fail_sent(self, error: BaseException) -> None:
        """Fail the calls sent and not answered (those the refused stream carried)."""
        with self._lock:
            calls = [call for call in self._pending.values() if call.sent]
            for call in calls:
                self._pending.pop(call.spec.task_id, None)
        for call in calls:
            self._release(call.arg_file)
            self._core.fail_locally(call.return_ids, error)

    def _inline_arg_file(self, call: PendingCall) -> None:
        """The actor now lives on another node: send the argument image inline."""
        try:
            call.spec.args_blob = arg_files.read_file_bytes(self._core.store_dir, call.arg_file)
        except OSError as exc:
            # Only this process removes its files; the node sweeps them only
            # once we are gone. Left as is, the actor reports the call failed.
            log.warning("argument file %s of a call to actor %s is unreadable: %s",
                        call.arg_file, self.actor_id.hex(), exc)
            return
        call.spec.args_file = ""
        self._release(call.arg_file)
        call.arg_file = ""

    def _pick_address(self, info: dict) -> str:
        addresses = (info.get("address") or "").split(",")
        if info.get("node_id") == self._core.node_id.hex():
            for address in addresses:
                if address.startswith("unix:"):
                    return address
        return next(a for a in addresses if not a.startswith("unix:"))

    def _fail_dead(self, info: dict, cause: str) -> None:
        """The actor is dead: fail every call, saying which ones never reached it."""
        def error(delivered: bool) -> exceptions.ActorDiedError:
            message = cause if delivered else "\n".join(filter(None, (cause, _NOT_DELIVERED)))
            return exceptions.ActorDiedError(
                actor_id=self.actor_id.hex(),
                class_name=info.get("class_name") or self.class_name,
                name=info.get("name") or None, node_id=info.get("node_id"),
                error_message=message)

        with self._lock:
            calls = list(self._pending.values())
            self._pending.clear()
            self._dead = error(False)     # later calls are never sent
        for call in calls:
            self._release(call.arg_file)
            self._core.fail_locally(call.return_ids, error(call.sent))

    def _fail_overdue(self, why: str, unreachable_since: float, *,
                      now_all: bool = False) -> None:
        """Fail the calls that have had no way to the actor for DELIVERY_TIMEOUT_S
        (all of them with `now_all`); each error says whether the call may have run."""
        now = time.monotonic()
        with self._lock:
            overdue = [call for call in self._pending.values()
                       if now_all or now - max(call.queued_at, unreachable_since)
                       >= DELIVERY_TIMEOUT_S]
            for call in overdue:
                self._pending.pop(call.spec.task_id, None)
        for call in overdue:
            self._release(call.arg_file)
            self._core.fail_locally(call.return_ids, exceptions.ActorUnavailableError(
                f"{why} (no way to the actor for {DELIVERY_TIMEOUT_S:.0f}s)"
                if not now_all else why, self.actor_id.hex(), delivered=call.sent))


@dataclass(frozen=True)
class _Cancel:
    """Queued for the link behind the calls: cancel the call `task_id`."""
    task_id: bytes


def maybe_delivered(handed: bool, refused: bool) -> bool:
    """Whether an unanswered call of an ended link may have reached the actor.

    Not when it never left this process, nor when the actor refused the
    link: it ends such a link only after answering every call it took.
    """
    return handed and not refused


def stream_refused(exc: BaseException) -> bool:
    """True when an ended actor link carries the actor's refusal (none of its
    unanswered calls ran)."""
    return isinstance(exc, LinkClosed) and exc.refused
