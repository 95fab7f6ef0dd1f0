"""What an actor caller concludes about a call whose stream ended unanswered."""
from __future__ import annotations

import grpc

from meshray import exceptions
from meshray.core.actor_client import REFUSED_KEY, maybe_delivered, stream_refused


class _StreamError(grpc.RpcError):
    def __init__(self, trailing):
        self._trailing = trailing

    def trailing_metadata(self):
        return self._trailing


def test_a_call_that_never_left_or_was_refused_did_not_run():
    assert maybe_delivered(handed=True, refused=False)
    assert not maybe_delivered(handed=False, refused=False)
    assert not maybe_delivered(handed=True, refused=True)


def test_only_the_actors_refusal_mark_counts_as_a_refusal():
    assert stream_refused(_StreamError(((REFUSED_KEY, "1"),)))
    assert not stream_refused(_StreamError((("other", "1"),)))
    assert not stream_refused(_StreamError(None))
    assert not stream_refused(ConnectionError("reset"))


def test_unavailable_error_says_whether_the_call_may_have_run():
    undelivered = exceptions.ActorUnavailableError("refused", b"\xaa", delivered=False)
    assert "was not executed" in str(undelivered) and "may or may not" not in str(undelivered)
    assert not undelivered.delivered
    maybe = exceptions.ActorUnavailableError("stream broke", b"\xaa")
    assert "may or may not have been executed" in str(maybe) and maybe.delivered
