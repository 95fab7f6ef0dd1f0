"""100,000 finished tasks list page by page and summarize, with most of them on disk.

The node keeps the newest finished tasks in memory and the rest in its
on-disk segments (docs/observability.md); a listing pages through both, in
task-id order, without missing or repeating one.
"""
from __future__ import annotations

import pytest

TASKS = 100_000

pytestmark = pytest.mark.meshray_init(num_cpus=2)


def test_a_hundred_thousand_tasks_list_and_summarize(ray):
    from meshray.util import state
    from meshray.util.state.api import query_state

    @ray.remote
    def noop():
        return None

    for _start in range(0, TASKS, 20_000):
        assert ray.get([noop.remote() for _ in range(20_000)]) == [None] * 20_000

    summary = state.summarize_tasks()["cluster"]
    (name,) = [n for n in summary["summary"] if n.endswith("noop")]
    assert summary["summary"][name]["state_counts"] == {"FINISHED": TASKS}

    seen, cursor, pages = 0, "", 0
    last_id = ""
    while True:
        page = query_state("tasks", filters=[("func_or_class_name", "=", name)],
                           limit=10_000, cursor=cursor)
        assert page["total"] == TASKS and page["dropped"] == 0
        ids = [item["task_id"] for item in page["items"]]
        assert ids == sorted(ids) and (not ids or ids[0] > last_id)
        seen += len(ids)
        pages += 1
        last_id = ids[-1] if ids else last_id
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == TASKS and pages == 10
