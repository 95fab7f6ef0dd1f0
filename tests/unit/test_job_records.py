"""Job records' pure rules: submissions checked, status moves, lost supervisors,
and the HTTP API's token check."""
from __future__ import annotations

import pytest

from meshray.coordination.keyspace import Keyspace
from meshray.node import job_records as jobs
from meshray.node.http_api import check_bearer


def _record(**fields):
    checked = jobs.check_submission({"entrypoint": "echo hi"})
    return {**jobs.new_record(checked, submission_id="job-1", now_ms=1000), **fields}


def test_a_submission_is_checked_naming_the_field():
    assert jobs.check_submission({"entrypoint": "echo", "max_retries": 2})["max_retries"] == 2
    for body, field in (({}, "entrypoint"), ({"entrypoint": "  "}, "entrypoint"),
                        ({"entrypoint": "x", "submission_id": "../etc"}, "submission_id"),
                        ({"entrypoint": "x", "metadata": {"a": 1}}, "metadata"),
                        ({"entrypoint": "x", "entrypoint_num_cpus": -1}, "entrypoint_num_cpus"),
                        ({"entrypoint": "x", "entrypoint_resources": {"CPU": 1}},
                         "entrypoint_resources"),
                        ({"entrypoint": "x", "max_retries": 1.5}, "max_retries")):
        with pytest.raises(ValueError, match=field):
            jobs.check_submission(body)


def test_status_moves_follow_the_table():
    running = jobs.apply_change(_record(), {"status": jobs.RUNNING, "for_attempt": 0})
    assert running["status"] == jobs.RUNNING and running["end_time"] is None
    done = jobs.apply_change(running, {"status": jobs.SUCCEEDED})
    assert done["end_time"] is not None
    with pytest.raises(jobs.InvalidTransition):
        jobs.apply_change(done, {"status": jobs.RUNNING})
    with pytest.raises(jobs.InvalidTransition):
        jobs.apply_change(_record(status=jobs.STOPPED), {"status": jobs.RUNNING})
    with pytest.raises(jobs.InvalidTransition, match="attempt"):
        jobs.apply_change(_record(attempt=1), {"status": jobs.RUNNING, "for_attempt": 0})


def test_a_lost_supervisor_fails_the_job_or_retries_it():
    running = _record(status=jobs.RUNNING, driver_node_id="aa")
    assert jobs.lost_supervisor_change(running, {"aa"}) is None
    assert jobs.lost_supervisor_change(_record(), set()) is None        # PENDING: not lost
    failed = jobs.lost_supervisor_change(running, {"bb"})
    assert failed["status"] == jobs.FAILED and "aa" in failed["message"]
    retry = jobs.lost_supervisor_change({**running, "max_retries": 1}, {"bb"})
    assert retry["status"] == jobs.PENDING and retry["attempt"] == 1
    stopped = jobs.lost_supervisor_change({**running, "stop_requested": True}, set())
    assert stopped["status"] == jobs.STOPPED


def test_job_keys_round_trip():
    keys = Keyspace()
    assert keys.parse_job(keys.job("raysubmit_Ab.1-x")) == "raysubmit_Ab.1-x"
    assert keys.job("a/b").startswith(keys.jobs_prefix()) and "/" not in keys.job("a/b")[
        len(keys.jobs_prefix()):]


def test_the_bearer_check_wants_the_exact_token():
    token = "t" * 32
    assert check_bearer(f"Bearer {token}", token)
    assert not check_bearer(f"Bearer {token}x", token)
    assert not check_bearer(token, token)
    assert not check_bearer(None, token)
    assert not check_bearer(f"Bearer {token}", None)


def test_the_first_driver_on_the_supervisor_node_names_a_running_job():
    change = jobs.driver_change(job_hex="0a0b", pid=42, node_ip="10.0.0.2", node_hex="aa")
    running = _record(status=jobs.RUNNING, driver_node_id="aa")
    named = jobs.apply_change(running, change(running))
    assert named["job_id"] == "0a0b"
    assert named["driver_info"] == {"id": "0a0b", "node_ip_address": "10.0.0.2", "pid": "42"}
    for record, why in ((named, "already has driver"),
                        (_record(), "not RUNNING"),
                        (_record(status=jobs.RUNNING, driver_node_id="bb"), "node bb")):
        with pytest.raises(jobs.InvalidTransition, match=why):
            change(record)


def test_a_retry_forgets_the_lost_attempts_driver():
    record = _record(status=jobs.RUNNING, driver_node_id="aa", max_retries=1, job_id="0a0b",
                     driver_info={"id": "0a0b"})
    retried = jobs.apply_change(record, jobs.lost_supervisor_change(record, {"bb"}))
    assert retried["status"] == jobs.PENDING and retried["job_id"] is None
    assert retried["driver_info"] is None
