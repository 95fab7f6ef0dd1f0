"""The job API's data types, with Ray's names and fields."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import Any

__all__ = ["JobDetails", "JobInfo", "JobStatus", "JobType"]


class JobStatus(str, Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"

    def __str__(self) -> str:
        return self.value

    def is_terminal(self) -> bool:
        return self in (JobStatus.STOPPED, JobStatus.SUCCEEDED, JobStatus.FAILED)


class JobType(str, Enum):
    SUBMISSION = "SUBMISSION"
    DRIVER = "DRIVER"


@dataclass
class JobInfo:
    """A job's status and what it was submitted with."""

    status: JobStatus
    entrypoint: str
    message: str | None = None
    error_type: str | None = None
    start_time: int | None = None           # ms since the epoch
    end_time: int | None = None
    metadata: dict | None = None
    runtime_env: dict | None = None
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None
    entrypoint_memory: int | None = None
    entrypoint_resources: dict | None = None
    driver_agent_http_address: str | None = None
    driver_node_id: str | None = None
    driver_exit_code: int | None = None

    @classmethod
    def from_dict(cls, data: dict) -> Any:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["status"] = JobStatus(values["status"])
        if "type" in values:
            values["type"] = JobType(values["type"])
        return cls(**values)


@dataclass
class JobDetails(JobInfo):
    """What the REST API answers for one job (Ray's JobDetails, and meshray's
    retry fields: attempt, max_retries)."""

    type: JobType = JobType.SUBMISSION
    job_id: str | None = None
    submission_id: str | None = None
    driver_info: dict | None = None
    attempt: int = 0
    max_retries: int = 0
    stop_requested: bool = False
    log_file: str | None = None
