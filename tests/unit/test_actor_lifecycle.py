"""The actor lifecycle: every event from every state, one writer, one restart rule."""
from __future__ import annotations

import itertools

import pytest

from meshray.node import actors as A
from meshray.rpc.generated import meshray_pb2 as pb

EVENTS = ("created", "init_failed", "worker_died", "killed", "owner_died", "node_died")


def _entry(state=A.PENDING, *, max_restarts=0, num_restarts=0, no_restart=False,
           exiting=False) -> A.ActorEntry:
    entry = A.ActorEntry(b"\x02" * 16, pb.TaskSpec(), None, {"max_restarts": max_restarts})
    entry.state = state          # the starting point of each case, set directly
    entry.num_restarts, entry.no_restart, entry.exiting = num_restarts, no_restart, exiting
    return entry


@pytest.mark.parametrize("state,event", list(itertools.product(
    [A.PENDING, A.ALIVE, A.RESTARTING], EVENTS)))
@pytest.mark.parametrize("max_restarts,num_restarts", [(0, 0), (2, 1), (2, 2), (-1, 99)])
def test_every_event_from_every_live_state(state, event, max_restarts, num_restarts):
    entry = _entry(state, max_restarts=max_restarts, num_restarts=num_restarts)
    new = A.apply(entry, event, "why")
    left = max_restarts == -1 or num_restarts < max_restarts
    expected = {"created": A.ALIVE, "init_failed": A.DEAD, "owner_died": A.DEAD}.get(
        event, A.RESTARTING if left else A.DEAD)
    assert new is expected and entry.state is expected
    assert entry.story[-1] == (state, expected, f"{event}: why")
    if expected is A.DEAD:
        assert entry.death_cause == "why"


@pytest.mark.parametrize("event", EVENTS)
def test_death_is_final(event):
    entry = _entry(A.DEAD)
    assert A.apply(entry, event) is A.DEAD


def test_kill_without_restart_and_exit_are_deaths_whatever_restarts_are_left():
    assert A.apply(_entry(A.ALIVE, max_restarts=-1, no_restart=True), "killed") is A.DEAD
    assert A.apply(_entry(A.ALIVE, max_restarts=-1, exiting=True), "worker_died") is A.DEAD
    killed = _entry(A.ALIVE, max_restarts=-1)
    assert A.apply(killed, "killed") is A.RESTARTING   # kill(no_restart=False) restarts


def test_an_illegal_move_raises_with_the_story(monkeypatch):
    entry = _entry(A.ALIVE)
    A.apply(entry, "created", "again")
    monkeypatch.setitem(A.ACTOR_TRANSITIONS, A.ALIVE, frozenset({A.DEAD}))
    with pytest.raises(A.InvalidActorTransition) as info:
        A.apply(entry, "created")
    assert "cannot move from ALIVE to ALIVE" in str(info.value)
    assert "ALIVE -> ALIVE: created: again" in str(info.value)
    assert entry.state is A.ALIVE


def test_unknown_event_is_an_error():
    with pytest.raises(ValueError, match="unknown actor event"):
        A.apply(_entry(), "teleported")


def test_state_is_recorded_as_its_plain_name():
    import json
    entry = _entry(A.RESTARTING)
    assert json.loads(json.dumps({"state": entry.state})) == {"state": "RESTARTING"}
    assert entry.state == "RESTARTING"
