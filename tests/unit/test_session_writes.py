"""The node writes a process's events from the handler that made them when
the session's writer is parked (Connection.flush_now), and leaves them to
the writer otherwise: the same events, in the same order, either way."""
from __future__ import annotations

import asyncio

from meshray.node.session import MAX_EVENTS_PER_BATCH, Connection


def _conn(written, *, congested=False):
    conn = Connection(1, asyncio.Queue())
    conn.write_now = written.append
    conn.congested = lambda: congested
    return conn


def test_a_parked_writer_lets_the_handler_write_everything_waiting_in_order():
    written = []
    conn = _conn(written)
    conn.parked = True
    for n in range(3):
        conn.send(n)
    assert conn.flush_now() is True
    assert written == [[0, 1, 2]] and conn.outbox.empty()
    assert conn.flush_now() is False                    # nothing left: nothing written


def test_events_stay_for_the_writer_whenever_it_could_reorder_or_must_see_them():
    cases = {
        "writer busy": dict(parked=False),
        "bytes unsent": dict(congested=True),
        "session ending": dict(ending=True),
        "closed": dict(closed=True),
        "failpoint": dict(drop_reply=True),
    }
    for case, fields in cases.items():
        written = []
        conn = _conn(written, congested=fields.pop("congested", False))
        conn.parked = True
        conn.outbox.put_nowait("event")
        for name, value in fields.items():
            setattr(conn, name, value)
        assert conn.flush_now() is False, case
        assert written == [] and conn.outbox.qsize() == 1, case


def test_a_batch_holds_at_most_the_writers_limit():
    written = []
    conn = _conn(written)
    conn.parked = True
    for n in range(MAX_EVENTS_PER_BATCH + 5):
        conn.outbox.put_nowait(n)
    conn.flush_now()
    assert len(written[0]) == MAX_EVENTS_PER_BATCH and conn.outbox.qsize() == 5


def test_sends_are_reported_so_the_daemon_knows_whom_to_write_to():
    seen = []
    conn = _conn([])
    conn.on_send = seen.append
    conn.send("a")
    conn.closed = True
    conn.send("b")                                      # a closed session takes nothing
    assert seen == [conn] and conn.outbox.qsize() == 1


def test_a_writer_woken_for_events_the_handler_wrote_waits_on_for_the_next():
    """The writer's wait was already woken by the event the handler then
    wrote: it must neither see that event again nor stop waiting."""
    async def scenario():
        written = []
        conn = _conn(written)

        async def writer():            # the daemon's session writer, its batching aside
            while (event := await conn.next_event()) is not None:
                written.append(["writer", event])

        task = asyncio.get_running_loop().create_task(writer())
        await asyncio.sleep(0)                          # the writer parks
        conn.send("first")                              # wakes it ...
        conn.flush_now()                                # ... but the handler writes it
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        conn.send("second")                             # the writer is parked again
        await asyncio.sleep(0)                          # and takes this one itself
        conn.end()
        await asyncio.wait_for(task, 5)
        return written

    assert asyncio.run(scenario()) == [["first"], ["writer", "second"]]
