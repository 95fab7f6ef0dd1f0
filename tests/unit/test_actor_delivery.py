"""What an actor caller concludes about a call whose link ended unanswered."""
from __future__ import annotations

from meshray import exceptions
from meshray.core.actor_client import maybe_delivered, stream_refused
from meshray.rpc.call_link import MALFORMED, UNAVAILABLE, LinkClosed


def test_a_call_that_never_left_or_was_refused_did_not_run():
    assert maybe_delivered(handed=True, refused=False)
    assert not maybe_delivered(handed=False, refused=False)
    assert not maybe_delivered(handed=True, refused=True)


def test_only_the_actors_refusal_counts_as_a_refusal():
    assert stream_refused(LinkClosed("lease lapsed", code=UNAVAILABLE, refused=True))
    assert not stream_refused(LinkClosed("dropped", code=UNAVAILABLE))
    assert not stream_refused(LinkClosed("bad batch", code=MALFORMED))
    assert not stream_refused(ConnectionError("reset"))


def test_unavailable_error_says_whether_the_call_may_have_run():
    undelivered = exceptions.ActorUnavailableError("refused", b"\xaa", delivered=False)
    assert "was not executed" in str(undelivered) and "may or may not" not in str(undelivered)
    assert not undelivered.delivered
    maybe = exceptions.ActorUnavailableError("stream broke", b"\xaa")
    assert "may or may not have been executed" in str(maybe) and maybe.delivered
