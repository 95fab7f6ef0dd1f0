"""Spill-victim policy: pure function, no files, runs in microseconds."""

import time
from dataclasses import dataclass

from meshray.object_store.eviction import SpillCandidate, choose_spill_victims


def C(oid, size, last_access, pinned=False):
    return SpillCandidate(oid, size, last_access, pinned)


def test_least_recently_used_goes_first():
    entries = [C(b"new", 10, 30), C(b"old", 10, 10), C(b"mid", 10, 20)]
    assert choose_spill_victims(entries, 10) == [b"old"]
    assert choose_spill_victims(entries, 11) == [b"old", b"mid"]
    assert choose_spill_victims(entries, 30) == [b"old", b"mid", b"new"]


def test_stops_as_soon_as_enough_is_freed():
    entries = [C(b"a", 100, 1), C(b"b", 1, 2), C(b"c", 1, 3)]
    assert choose_spill_victims(entries, 50) == [b"a"]


def test_pinned_objects_are_never_chosen():
    entries = [C(b"pinned", 100, 1, pinned=True), C(b"free", 10, 5)]
    assert choose_spill_victims(entries, 10) == [b"free"]


def test_none_when_unpinned_objects_cannot_cover_the_need():
    entries = [C(b"pinned", 100, 1, pinned=True), C(b"free", 10, 5)]
    assert choose_spill_victims(entries, 11) is None
    assert choose_spill_victims([], 1) is None


def test_nothing_needed_means_empty_list_not_none():
    entries = [C(b"a", 10, 1)]
    assert choose_spill_victims(entries, 0) == []
    assert choose_spill_victims(entries, -5) == []
    assert choose_spill_victims([], 0) == []


def test_exact_fit():
    entries = [C(b"a", 7, 1), C(b"b", 3, 2)]
    assert choose_spill_victims(entries, 10) == [b"a", b"b"]


def test_zero_sized_objects_are_skipped():
    entries = [C(b"empty", 0, 1), C(b"real", 5, 2)]
    assert choose_spill_victims(entries, 5) == [b"real"]


def test_ties_keep_input_order():
    entries = [C(b"x", 1, 7), C(b"y", 1, 7), C(b"z", 1, 7)]
    assert choose_spill_victims(entries, 2) == [b"x", b"y"]
    assert choose_spill_victims(list(reversed(entries)), 2) == [b"z", b"y"]


def test_accepts_any_object_with_the_fields_and_any_iterable():
    @dataclass
    class Entry:
        object_id: str
        size: int
        last_access: int
        pinned: bool

    gen = (Entry(name, 4, t, False) for name, t in [("late", 9), ("early", 1)])
    assert choose_spill_victims(gen, 4) == ["early"]


def test_input_is_not_modified():
    entries = [C(b"b", 1, 2), C(b"a", 1, 1)]
    before = list(entries)
    choose_spill_victims(entries, 2)
    assert entries == before


def test_fast_on_a_large_store():
    entries = [C(i.to_bytes(4, "big"), 1000, (i * 7919) % 10007) for i in range(10_000)]
    start = time.perf_counter()
    victims = choose_spill_victims(entries, 500_000)
    elapsed = time.perf_counter() - start
    assert len(victims) == 500
    accessed = {e.object_id: e.last_access for e in entries}
    chosen = [accessed[v] for v in victims]
    assert chosen == sorted(chosen)
    assert max(chosen) <= min(t for oid, t in accessed.items() if oid not in set(victims))
    assert elapsed < 0.05
