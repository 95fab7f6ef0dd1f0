"""scheduler/peer_load.py: a peer's room for spilled work from the freshest report."""
from __future__ import annotations

from meshray.scheduler.peer_load import (
    LOAD_TRUSTED_S,
    backlog_left,
    newest_available,
    peer_room,
    total_of,
    with_backlog,
    worth_queueing,
)

BUSY = {"CPU": 0.0}
FREE = {"CPU": 1.0}


def test_etcd_only_when_no_batch_load_arrived():
    assert newest_available(FREE, 5.0, None, None, now=9.0) == FREE
    assert newest_available(FREE, None, None, None, now=9.0) == FREE


def test_batch_load_newer_than_the_etcd_change_wins():
    # A result batch at t=10.5 says the peer is free; etcd last changed at 10.
    assert newest_available(BUSY, 10.0, FREE, 10.5, now=11.0) == FREE
    # Never saw etcd change for it: the load is all there is.
    assert newest_available(BUSY, None, FREE, 10.5, now=20.0) == FREE


def test_etcd_value_arriving_right_after_a_load_may_predate_it():
    # etcd changed at 10.05, just after the load received at 10.0: it may have
    # been published before the batch was sent, so the load still counts.
    now = 10.0 + LOAD_TRUSTED_S / 2
    assert newest_available(BUSY, 10.05, FREE, 10.0, now=now) == FREE


def test_etcd_change_well_after_the_load_wins():
    now = 10.0 + LOAD_TRUSTED_S + 0.5
    assert newest_available(FREE, 10.3, BUSY, 10.0, now=now) == FREE
    assert newest_available(BUSY, 10.3, FREE, 10.0, now=now) == BUSY


def test_unanswered_offers_are_taken_off_and_room_never_goes_negative():
    assert peer_room({"CPU": 2.0, "GPU": 1.0}, {"CPU": 1.0}) == {"CPU": 1.0, "GPU": 1.0}
    assert peer_room({"CPU": 1.0}, {"CPU": 3.0, "memory": 5.0}) == {"CPU": 0.0, "memory": 0.0}
    assert peer_room(FREE, {}) == FREE


def test_backlog_left_counts_unanswered_offers():
    assert backlog_left(2, 0) == 2
    assert backlog_left(2, 1) == 1
    assert backlog_left(2, 5) == 0
    assert backlog_left(0, 0) == 0


def test_with_backlog_shows_room_for_exactly_the_request():
    room = {"CPU": 0.0, "memory": 4.0}
    shown = with_backlog(room, {"CPU": 4.0, "memory": 8.0}, {"CPU": 2.0}, backlog=1)
    assert shown == {"CPU": 2.0, "memory": 4.0}
    # The input is left alone.
    assert room == {"CPU": 0.0, "memory": 4.0}


def test_with_backlog_needs_places_left_and_a_total_that_fits():
    room = {"CPU": 0.0}
    assert with_backlog(room, {"CPU": 1.0}, {"CPU": 1.0}, backlog=0) == room
    assert with_backlog(room, {"CPU": 1.0}, {"CPU": 2.0}, backlog=3) == room
    assert with_backlog(room, {"CPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}, backlog=3) == room


def test_with_backlog_never_lowers_room_already_free():
    assert with_backlog({"CPU": 3.0}, {"CPU": 4.0}, {"CPU": 1.0}, backlog=1) == {"CPU": 3.0}


def test_total_of_sums_the_unanswered_offers():
    assert total_of([]) == {}
    assert total_of([{"CPU": 1.0}, {"CPU": 0.5, "GPU": 1.0}]) == {"CPU": 1.5, "GPU": 1.0}


def test_queueing_at_a_peer_is_worth_it_only_when_the_task_starts_sooner_there():
    # One-CPU peer, empty queue, nothing offered: it would start after one
    # peer task; here the last of 2 waiting would start after 2.
    assert worth_queueing(0, 0, 1.0, 2.0)
    assert not worth_queueing(0, 0, 1.0, 1.0)         # equal: it stays
    assert not worth_queueing(1, 0, 1.0, 2.0)         # the peer's queue is as long
    assert not worth_queueing(0, 1, 1.0, 2.0)         # an offer not yet answered counts
    assert worth_queueing(3, 0, 4.0, 1.5)             # more CPUs there: shorter per CPU
    assert worth_queueing(0, 0, 0.0, 1.5)             # a CPU-less peer counts as one
