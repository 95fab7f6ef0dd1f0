"""Pure parts of generator calls: stream readiness, and when an actor's call stream may end."""
from __future__ import annotations

from meshray.core.actor_host import _CallStream, is_stream_item
from meshray.core.streams import stream_ready
from meshray.rpc.generated import meshray_pb2 as pb


def test_stream_ready_says_ready_pending_or_finished():
    assert stream_ready({}, None, 0) == "pending"
    assert stream_ready({1: b"a"}, None, 0) == "ready"
    assert stream_ready({1: b"a"}, None, 1) == "pending"
    assert stream_ready({1: b"a"}, 1, 1) == "finished"
    assert stream_ready({1: b"a", 2: b"b"}, 2, 1) == "ready"


def test_items_do_not_answer_a_call_so_a_half_closed_stream_waits_for_the_answer():
    stream = _CallStream()
    stream.started()
    stream.input_ended()
    item = pb.TaskResult(task_id=b"t", stream_item_id=b"i", stream_index=1)
    assert is_stream_item(item) and not is_stream_item(pb.TaskResult(task_id=b"t"))
    stream.reply(item)
    assert stream.replies.get_nowait() is item
    assert stream.replies.empty()            # not ended: the call is still running
    answer = pb.TaskResult(task_id=b"t")
    stream.reply(answer)
    assert stream.replies.get_nowait() is answer
    assert stream.replies.get_nowait() is None      # answered: now the stream ends
