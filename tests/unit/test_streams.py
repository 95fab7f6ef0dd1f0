"""Pure parts of generator calls: stream readiness, and when an actor's call stream may end."""
from __future__ import annotations

from meshray.core.actor_host import MalformedArguments, CallStream, is_stream_item
from meshray.core.streams import stream_ready
from meshray.rpc import call_link
from meshray.rpc.generated import meshray_pb2 as pb


def test_stream_ready_says_ready_pending_or_finished():
    assert stream_ready({}, None, 0) == "pending"
    assert stream_ready({1: b"a"}, None, 0) == "ready"
    assert stream_ready({1: b"a"}, None, 1) == "pending"
    assert stream_ready({1: b"a"}, 1, 1) == "finished"
    assert stream_ready({1: b"a", 2: b"b"}, 2, 1) == "ready"


class _Recorder:
    """Stands in for a call link: records what the stream writes on it."""

    def __init__(self):
        self.sent: list = []
        self.shut = False

    def send(self, kind, payload=b"", now=True):
        self.sent.append((kind, payload, now))

    def wait_idle(self, timeout):
        return True

    def shutdown_write(self):
        self.shut = True


def _results(sent):
    return [r for kind, payload, _now in sent if kind == call_link.REPLIES
            for r in pb.ActorReplyBatch.FromString(payload).results]


def test_items_do_not_answer_a_call_so_a_half_closed_stream_waits_for_the_answer():
    link, answered = _Recorder(), []
    stream = CallStream(link, answered.extend)
    stream.started()
    stream.end(call_link.status_payload(call_link.OK))
    item = pb.TaskResult(task_id=b"t", stream_item_id=b"i", stream_index=1)
    assert is_stream_item(item) and not is_stream_item(pb.TaskResult(task_id=b"t"))
    stream.reply(item)
    assert _results(link.sent) == [item] and not stream.done.is_set()   # the call still runs
    answer = pb.TaskResult(task_id=b"t")
    stream.reply(answer)
    assert _results(link.sent) == [item, answer] and answered == [answer]
    assert link.sent[-1][0] == call_link.STATUS and link.sent[-1][1][0] == call_link.OK
    assert stream.done.is_set()                     # answered: now the link ends


def test_a_refusal_goes_only_after_every_call_read_is_answered():
    link = _Recorder()
    stream = CallStream(link, lambda results: None)
    for _ in range(2):
        stream.started()
    stream.end(call_link.status_payload(call_link.UNAVAILABLE, "lease lapsed", refused=True))
    stream.reply(pb.TaskResult(task_id=b"a"))
    assert [kind for kind, _p, _n in link.sent] == [call_link.REPLIES]
    stream.reply(pb.TaskResult(task_id=b"b"))
    kind, payload, _now = link.sent[-1]
    assert kind == call_link.STATUS and payload[:2] == bytes([call_link.UNAVAILABLE, 1])
    assert b"lease lapsed" in payload


def test_an_answer_its_caller_waits_for_alone_is_written_at_once_a_burst_is_left_to_the_writer():
    link = _Recorder()
    stream = CallStream(link, lambda results: None)
    for _ in range(3):
        stream.started()
    for name in (b"a", b"b", b"c"):
        stream.reply(pb.TaskResult(task_id=name))
    assert [now for _k, _p, now in link.sent] == [False, False, True]


def test_malformed_arguments_end_the_link_at_once_with_invalid_argument():
    link = _Recorder()
    stream = CallStream(link, lambda results: None)
    stream.started()
    stream.started()
    stream.reply(MalformedArguments("args_blob: not a pickle"))
    kind, payload, _now = link.sent[-1]
    assert kind == call_link.STATUS and payload[0] == call_link.MALFORMED
    assert b"args_blob: not a pickle" in payload and link.shut and stream.done.is_set()
