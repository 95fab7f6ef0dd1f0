"""Ray's job submission API: run a shell command (the entrypoint) on the cluster.

`JobSubmissionClient` talks to the HTTP API every node serves
(meshray/node/http_api.py); the entrypoint runs under a supervisor actor
placed like any actor with the entrypoint's resources. docs/jobs.md says how.
"""
from meshray.job_submission.client import JobSubmissionClient
from meshray.job_submission.models import JobDetails, JobInfo, JobStatus, JobType

__all__ = ["JobDetails", "JobInfo", "JobStatus", "JobSubmissionClient", "JobType"]
