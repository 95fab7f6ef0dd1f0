"""The shell around the node's state machine for tasks placed here.

`TaskDispatch.handle(event)` hands an event to :class:`NodeState`
(``node/state/``), which decides, and carries out the instructions it
returns, in order, through the node's collaborators: the worker pool, the
peer duties, runtime-env setup, object transfer and the daemon's delivery of
values. The table `_carry_out` is the one place that says which collaborator
carries out which instruction; nothing here decides what happens to a task.
"""
from __future__ import annotations

import asyncio
import time

from meshray.common import ids
from meshray.node.state import NodeState
from meshray.node.state import messages as m
from meshray.rpc.generated import meshray_pb2 as pb

__all__ = ["TaskDispatch"]


class TaskDispatch:
    """Feeds events to the node's `NodeState` and carries out its instructions."""

    def __init__(self, node):
        self._node = node
        self.machine = NodeState(resources=node.resources, queue=node.queue,
                                 bundles=node.placement, log=node.events,
                                 gpu_ids=node.config.gpu_ids, tasks=node.tasks,
                                 actors=node.actors, peer_dead=self._peer_dead,
                                 objects=node.objects)
        self._carry_out = {
            m.Execute: self._execute,
            m.Prefetch: lambda ins: node.transfer.prefetch_args(ins.task),
            m.EnsureWorkers: self._ensure_workers,
            m.Finish: lambda ins: node._finish(ins.task, list(ins.values)),
            m.FailTask: lambda ins: node._finish_failed(ins.task, ins.error),
            m.Replace: lambda ins: node.peers.place_or_queue(ins.task),
            m.ReplaceLater: self._replace_later,
            m.KillWorker: lambda ins: node.pool.kill(ins.worker),
            m.KillTask: lambda ins: ins.worker.conn.send(
                pb.ServerEvent(kill=pb.KillTask(task_id=ins.task.task_id))),
            m.ReportCrash: lambda ins: node.report_crash(ins.task, ins.worker),
            m.CancelRemote: self._cancel_remote,
            m.Unwait: self._unwait,
            m.GroupRemoved: lambda ins: node._finish_failed(
                ins.task, node.placement.group_removed_error(ins.task)),
            m.Spill: lambda ins: node.peers.spill(ins.task, ins.candidates),
            m.ConfirmMember: lambda ins: node.peers.confirm_member(ins),
            m.Notice: lambda ins: ins.task.owner.send(
                pb.ServerEvent(notice=pb.Notice(text=ins.text))),
            m.ActorChanged: lambda ins: node.hosting.changed(ins.entry, ins.publish),
            m.ReleaseActorName: lambda ins: node.hosting.release_name(ins.entry),
            m.RestartActor: lambda ins: node.hosting.restart(ins.entry),
            m.AskHostToKill: lambda ins: node.hosting.ask_host_to_kill(
                ins.entry, ins.no_restart, ins.cause),
            m.ActorCreationLost: lambda ins: node.hosting.creation_lost(ins.task, ins.entry),
            m.Deliver: lambda ins: node.deliver(ins.holder, ins.value),
            m.FreeValue: lambda ins: node.peers.free_value(ins.value),
            m.ValuesReady: self._values_ready,
            m.TellOwners: lambda ins: node.peers.tell_owners(ins),
            **node.leases.instructions(),
        }

    def _peer_dead(self, node_hex: str) -> bool:
        return node_hex in self._node.peers.view.known_dead

    def attach_pool(self, pool) -> None:
        """The node serves: its workers come from `pool` from now on."""
        self.machine.workers = pool

    def handle(self, event) -> None:
        """Let the state machine decide on `event`, then do what it says."""
        carry_out = self._carry_out
        for instruction in self.machine.handle(event):
            carry_out[type(instruction)](instruction)

    def carry_out(self, instructions: list) -> None:
        """Do what the state machine said (for a caller that had to look at
        the task's new state before anything is sent)."""
        carry_out = self._carry_out
        for instruction in instructions:
            carry_out[type(instruction)](instruction)

    def schedule(self) -> None:
        """Start queued tasks while resources and workers allow (none while draining)."""
        node = self._node
        if not self.machine.draining and node.placement.bundles:
            node.placement.take_bundles()
        self.handle(m.Schedule(time.monotonic(), time.time()))

    # ------------------------------------------------------------ instructions
    def _execute(self, ins: m.Execute) -> None:
        node = self._node
        task, worker = ins.task, ins.worker
        spec = task.spec
        execute = pb.ExecuteTask(spec=spec)
        if spec.function_id not in worker.functions_sent:
            execute.function_pickled = node.functions.get(spec.function_id, b"")
            worker.functions_sent.add(spec.function_id)
        if task.remote_args is not None:
            execute.args.extend(task.remote_args)
        else:
            for object_id in spec.arg_ref_ids:
                execute.args.append(node.peers.exportable(node.objects.get(object_id)))
        execute.assigned_gpu_ids.extend(task.gpu_ids)
        worker.conn.send(pb.ServerEvent(execute=execute))

    def _ensure_workers(self, ins: m.EnsureWorkers) -> None:
        node = self._node
        missing = ins.wanted - node.pool.starting.get(ins.task.worker_key, 0)
        if missing > 0:
            node.envs.start_workers_for(ins.task, missing)

    def _replace_later(self, ins: m.ReplaceLater) -> None:
        asyncio.get_running_loop().call_later(ins.delay, self._place_after_backoff, ins.task)

    def _place_after_backoff(self, task) -> None:
        """A memory-killed task's retry delay is over: place it (unless it ended meanwhile)."""
        if self._node.tasks.get(task.task_id) is not task or task.state != "waiting":
            return
        self._node.peers.place_or_queue(task)

    def _cancel_remote(self, ins: m.CancelRemote) -> None:
        task = ins.task
        self._node.peers.send(task.remote_node, pb.PeerEvent(cancel_remote=pb.CancelTask(
            object_id=ids.object_id_for(task.task_id, 1), force=ins.force,
            recursive=ins.recursive)))

    def _values_ready(self, ins: m.ValuesReady) -> None:
        object_ready = self._node.transfer.object_ready
        for object_id in ins.object_ids:
            object_ready(object_id)

    def _unwait(self, ins: m.Unwait) -> None:
        # (The machine sends it only for a task waiting for its group's bundle.)
        self._node.placement.drop_waiting(ins.task)
