"""The state API's pure query logic: validation, filters, pages, merges, summaries."""
from __future__ import annotations

import pytest

from meshray.node.state_queries import (
    check_query,
    local_page,
    merge_pages,
    merge_summaries,
    summarize,
)


def _tasks(prefix: str, count: int, state="FINISHED"):
    return [{"task_id": f"{prefix}{i:04d}", "state": state, "func_or_class_name": f"f{i % 2}",
             "type": "NORMAL_TASK", "worker_pid": 100 + i, "events": []} for i in range(count)]


def test_queries_are_validated_field_by_field():
    with pytest.raises(ValueError, match="resource='secrets'"):
        check_query({"resource": "secrets"})
    with pytest.raises(ValueError, match="filter column='x'"):
        check_query({"resource": "tasks", "filters": [["x", "=", 1]]})
    with pytest.raises(ValueError, match="filter predicate='~'"):
        check_query({"resource": "tasks", "filters": [["state", "~", 1]]})
    with pytest.raises(ValueError, match="filter value"):
        check_query({"resource": "tasks", "filters": [["state", "=", {"a": 1}]]})
    with pytest.raises(ValueError, match="limit=True"):
        check_query({"resource": "tasks", "limit": True})
    with pytest.raises(ValueError, match="cursor=5"):
        check_query({"resource": "tasks", "cursor": 5})
    with pytest.raises(ValueError, match="query=\\[\\]"):
        check_query([])


def test_filters_compare_strings_without_case_and_numbers_as_numbers():
    records = _tasks("a", 4) + _tasks("b", 2, state="FAILED")
    query = check_query({"resource": "tasks", "filters": [["state", "=", "failed"]]})
    assert [r["task_id"] for r in local_page(records, query)["items"]] == ["b0000", "b0001"]
    query = check_query({"resource": "tasks", "filters": [["worker_pid", "=", "101"],
                                                          ["state", "!=", "FAILED"]]})
    assert [r["task_id"] for r in local_page(records, query)["items"]] == ["a0001"]


def test_pages_merge_in_id_order_and_the_cursor_visits_each_record_once():
    nodes = {"n1": _tasks("a", 7) + _tasks("c", 3), "n2": _tasks("b", 5)}
    seen, cursor = [], ""
    while True:
        query = check_query({"resource": "tasks", "limit": 4, "cursor": cursor})
        merged = merge_pages({n: local_page(r, query) for n, r in nodes.items()}, query)
        assert merged["total"] == 15 and len(merged["items"]) <= 4
        seen += [item["task_id"] for item in merged["items"]]
        cursor = merged["next_cursor"]
        if not cursor:
            break
    assert seen == sorted(seen) and len(set(seen)) == 15


def test_detail_fields_are_left_out_unless_asked():
    query = check_query({"resource": "tasks"})
    assert "events" not in local_page(_tasks("a", 1), query)["items"][0]
    query = check_query({"resource": "tasks", "detail": True})
    assert "events" in local_page(_tasks("a", 1), query)["items"][0]


def test_missing_nodes_are_reported_with_the_merge():
    query = check_query({"resource": "tasks"})
    merged = merge_pages({"n1": local_page(_tasks("a", 2), query)}, query,
                         {"n2": "TimeoutError"})
    assert merged["missing"] == {"n2": "TimeoutError"} and merged["nodes"] == ["n1"]


def test_summaries_count_per_name_and_state_and_add_up_across_nodes():
    query = check_query({"resource": "tasks"})
    one = summarize(_tasks("a", 4), query)
    two = summarize(_tasks("b", 3, state="FAILED"), query)
    merged = merge_summaries([one, two])
    assert merged["f0"]["state_counts"] == {"FINISHED": 2, "FAILED": 2}
    assert merged["f1"]["state_counts"] == {"FINISHED": 2, "FAILED": 1}
    with pytest.raises(ValueError, match="for a summary"):
        summarize([], check_query({"resource": "nodes"}))
