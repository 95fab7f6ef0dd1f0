"""The worker-side half of a worker lease: tasks pushed by the lease's holder.

Every worker listens on a unix socket in its node's session directory from
the moment it starts (its hello names it), and serves on it only while its
node has leased it: each batch of calls names the lease it is sent under,
and the worker runs it only if that is the lease its node told it of
(``LeaseChange``, on its session). The node tells the worker before it
answers the holder, so the first batch almost always finds the lease
known; if it does not, the worker waits for it up to LEASE_KNOWN_WAIT_S,
then refuses the batch. A refusal says none of the batch ran, so the holder
sends those tasks through the node instead, with no retry spent.

Tasks run on the main thread, one at a time, in arrival order -- exactly as
the node's own tasks do on this worker -- so a cancel interrupts one the
same way (KeyboardInterrupt, executor.py). Results go back on the link; a
value stored in the node's store (or holding refs) is handed to the node
first (as an actor's return is), so it lives until the holder claims it.
The worker tells its node when each pushed task starts and ends
(``LeasedTask``): its memory monitor, state API and metrics see pushed tasks
as they see the node's own.

Why a socket per worker rather than one per lease: a lease is granted in
one node round trip, and the holder connects at once; binding then would put
a second wait (the worker's answer) on every lease.
"""
from __future__ import annotations

import logging
import os
import threading

from meshray.common.worker_socket import worker_socket_path
from meshray.core import call_rules, state as state_mod
from meshray.core.actor_host import CallStream
from meshray.rpc import call_link, strict
from meshray.rpc.call_link import LinkServer, status_payload
from meshray.rpc.generated import meshray_pb2 as pb

__all__ = ["LeaseHost"]

log = logging.getLogger(__name__)

LEASE_KNOWN_WAIT_S = 2.0
LEASE_METHOD = "/meshray.WorkerLease/Push"       # how malformed batches are logged
_FINAL_WRITE_S = 5.0


class LeaseHost:
    """Serves the links of lease holders to this worker (see the module doc)."""

    def __init__(self, executor, *, session_dir: str, worker_id: bytes, token: str | None):
        self.executor = executor
        self._lease = b""                       # the lease the node says we are under
        self._changed = threading.Condition()
        self._function_bytes: dict[bytes, bytes] = {}
        self._malformed_log = strict.MalformedLog()
        path = worker_socket_path(session_dir, worker_id)
        self._server = LinkServer([f"unix:{path}"], token=token,
                                  on_link=self._serve_link, failpoint=LEASE_METHOD)
        self.address = self._server.addresses[0]

    def on_lease(self, change: pb.LeaseChange) -> None:
        """The node leased this worker, or ended its lease (the session's reader)."""
        with self._changed:
            if change.granted:
                self._lease = change.lease_id
            elif self._lease == change.lease_id:
                self._lease = b""
            self._changed.notify_all()

    def _lease_is(self, lease_id: bytes) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._lease == lease_id, LEASE_KNOWN_WAIT_S)

    # ------------------------------------------------------------ links
    def _serve_link(self, link) -> None:
        stream = CallStream(link, lambda results: None)   # (the node hears of each task itself)
        self._read_calls(link, stream)
        stream.done.wait()
        link.drain(_FINAL_WRITE_S)

    def _read_calls(self, link, stream: CallStream) -> None:
        for batch in stream.batches(LEASE_METHOD, call_rules.check_lease_call_batch,
                                    self._malformed_log):
            if batch.calls and not self._lease_is(batch.lease_id):
                # Never run a task the node has not leased this worker for.
                stream.end(status_payload(call_link.UNAVAILABLE, (
                    f"worker {os.getpid()} is not leased under {batch.lease_id.hex()}; "
                    "the tasks sent under it are refused (not run)"), refused=True))
                return
            for function in batch.functions:
                self._function_bytes.setdefault(function.function_id, function.pickled)
            for spec in batch.calls:
                stream.started()
                self.executor.enqueue_leased(spec, stream.reply)
            for task_id in batch.cancel_task_ids:
                self.executor.cancel(task_id)

    # ------------------------------------------------------------ running (main thread)
    def run(self, spec, reply) -> None:
        """Run one pushed task (a cancel that came first fails it as cancelled: executor.run)."""
        executor = self.executor
        state_mod.state.gpu_ids = []
        state_mod.state.namespace = spec.namespace

        def body():
            function = executor.function_for(spec, self._function_bytes.get(spec.function_id))
            values = executor.fetch_arg_values(spec)
            args, kwargs = executor.resolve_args(spec, values)
            return function(*args, **kwargs)

        core = executor.core
        # Its node must know what runs here: its memory monitor names (and
        # judges) it, its state API and metrics show it.
        core.send_leased_task(spec, finished=False)
        failed = True
        try:
            failed = executor.run(spec, body, self._deliver(reply)).failed
        finally:
            core.send_leased_task(spec, finished=True, failed=failed)

    def _deliver(self, reply):
        core = self.executor.core

        def deliver(result: pb.TaskResult) -> None:
            # Values the node must track (stored, or holding refs) are held
            # for us by the node until the holder registers them.
            for value in result.returns:
                if value.in_store or value.contained_ids:
                    core.send_handoff(value)
            reply(result)
        return deliver

    def close(self) -> None:
        self._server.close()

