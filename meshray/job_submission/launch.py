"""`python -m meshray.job_submission.launch SUBMISSION_ID ATTEMPT`: create a job's supervisor.

Started by the node that accepted the submission (node/job_api.py), with
MESHRAY_ADDRESS and MESHRAY_PREFERRED_NODE naming that node. A short-lived
driver: it reads the job record, creates the detached supervisor actor with
the entrypoint's resources and runtime_env (packaged here, as any driver
packages its runtime_env), waits until the actor is registered, and exits;
the actor outlives it. A non-zero exit fails the job with this process's
stderr (the node watches it).
"""
from __future__ import annotations

import sys
import time

__all__ = ["main", "supervisor_options"]

REGISTER_TIMEOUT_S = 60.0


def supervisor_options(record: dict) -> dict:
    """Actor options for the supervisor of `record` (pure)."""
    from meshray.node.job_api import SUPERVISOR_NAMESPACE, supervisor_name
    options = {"name": supervisor_name(record["submission_id"], record.get("attempt", 0)),
               "namespace": SUPERVISOR_NAMESPACE, "lifetime": "detached", "max_restarts": 0,
               "num_cpus": record.get("entrypoint_num_cpus") or 0}
    if record.get("entrypoint_num_gpus"):
        options["num_gpus"] = record["entrypoint_num_gpus"]
    if record.get("entrypoint_memory"):
        options["memory"] = record["entrypoint_memory"]
    if record.get("entrypoint_resources"):
        options["resources"] = dict(record["entrypoint_resources"])
    if record.get("runtime_env"):
        options["runtime_env"] = dict(record["runtime_env"])
    return options


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: python -m meshray.job_submission.launch SUBMISSION_ID ATTEMPT",
              file=sys.stderr)
        return 2
    submission_id, attempt = argv[0], int(argv[1])
    import meshray
    from meshray.core.state import state
    from meshray.job_submission.supervisor import JobSupervisor

    meshray.init(log_to_driver=False)
    try:
        record = state.core.request("job_get", {"submission_id": submission_id})
        if record["status"] != "PENDING" or record.get("attempt", 0) != attempt:
            return 0                   # stopped meanwhile, or another attempt took over
        options = supervisor_options(record)
        meshray.remote(JobSupervisor).options(**options).remote(submission_id, attempt)
        deadline = time.monotonic() + REGISTER_TIMEOUT_S
        while True:
            found = state.core.request("get_named_actor", {"name": options["name"],
                                                           "namespace": options["namespace"]})
            if found.get("state") != "UNKNOWN":
                return 0               # the name is claimed: the actor exists
            if time.monotonic() > deadline:
                print(f"the supervisor of job {submission_id} was not registered within "
                      f"{REGISTER_TIMEOUT_S:.0f}s", file=sys.stderr)
                return 1
            time.sleep(0.1)
    finally:
        meshray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
