"""The actor's call recorder: which calls are itemized, which counted, and
what one report says (no process: a fake clock and a list for reports)."""
from __future__ import annotations

from types import SimpleNamespace

from meshray.core.actor_task_events import ActorTaskRecorder
from meshray.rpc.generated import meshray_pb2 as pb


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def spec(i: int, method: str = "work") -> pb.TaskSpec:
    return pb.TaskSpec(task_id=i.to_bytes(16, "big"), method_name=method, job_id=b"j" * 8,
                       parent_task_id=b"p" * 16, attempt=0)


def result(i: int, failed: bool = False):
    return SimpleNamespace(task_id=i.to_bytes(16, "big"), failed=failed)


def recorder(per_second: int = 3):
    clock, reports = Clock(), []
    return ActorTaskRecorder("Busy", reports.append, clock=clock, per_second=per_second,
                             thread=False), clock, reports


def counts(report) -> dict:
    return {name: (done, failed) for name, done, failed in
            zip(report.names, report.counted_finished, report.counted_failed) if done or failed}


def test_calls_past_the_rate_are_counted_by_method_and_outcome():
    rec, _clock, reports = recorder(per_second=3)
    rec.received([spec(i) for i in range(10)])
    rec.answered([result(i, failed=i in (8, 9)) for i in range(10)])
    rec.flush()
    (report,) = reports
    assert len(report.task_ids) == 3 * 16            # the first three: itemized
    assert list(report.finished) == [100.0] * 3 and not any(report.failed)
    assert counts(report) == {"Busy.work": (5, 2)}   # the other seven: counted


def test_the_itemizing_budget_refills_with_time_up_to_a_second():
    rec, clock, reports = recorder(per_second=3)
    rec.received([spec(i) for i in range(3)])
    clock.now += 0.5                                 # 1.5 calls' worth back
    rec.received([spec(i) for i in range(3, 6)])
    clock.now += 10.0                                # never more than one second's worth
    rec.received([spec(i) for i in range(6, 12)])
    rec.answered([result(i) for i in range(12)])
    rec.flush()
    (report,) = reports
    assert len(report.task_ids) // 16 == 3 + 1 + 3
    assert counts(report) == {"Busy.work": (5, 0)}


def test_running_calls_are_listed_until_answered_and_internal_calls_never():
    rec, clock, reports = recorder(per_second=10)
    rec.received([spec(1), spec(2, "__ray_ready__")])
    rec.flush()
    assert list(reports[-1].finished) == [0.0]       # running
    assert list(reports[-1].names) == ["Busy.work"]
    clock.now += 1.0
    rec.answered([result(1), result(2), result(99)])  # 2: internal, 99: unknown
    rec.flush()
    assert list(reports[-1].finished) == [101.0]
    rec.flush()                                     # nothing finished or running: no report
    assert len(reports) == 2


def test_nothing_is_recorded_when_task_events_are_off():
    reports = []
    rec = ActorTaskRecorder("Busy", reports.append, enabled=False, thread=False)
    rec.received([spec(1)])
    rec.answered([result(1)])
    rec.flush()
    assert reports == []
