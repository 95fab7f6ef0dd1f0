"""`meshray job submit | status | logs | stop | list | delete`: Ray's job CLI.

Each talks to a node's HTTP API through JobSubmissionClient (--address, else
MESHRAY_ADDRESS/RAY_ADDRESS when an http(s) URL, else the node on this
machine).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

__all__ = ["add_parser"]


def _json_object(flag: str, text: str | None):
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{flag}={text!r}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag}={text!r}: expected a JSON object")
    return value


def _client(args):
    from meshray.job_submission import JobSubmissionClient
    return JobSubmissionClient(args.address, verify=not getattr(args, "no_verify", False))


def _follow(client, job_id: str) -> None:
    for chunk in client.tail_lines(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def _cmd_submit(args) -> int:
    entrypoint = list(args.entrypoint)
    if entrypoint and entrypoint[0] == "--":
        entrypoint = entrypoint[1:]
    if not entrypoint:
        raise ValueError("meshray job submit needs an entrypoint: meshray job submit -- "
                         "python script.py")
    runtime_env = _json_object("--runtime-env-json", args.runtime_env_json) or {}
    if args.working_dir:
        runtime_env["working_dir"] = args.working_dir
    client = _client(args)
    job_id = client.submit_job(
        entrypoint=" ".join(entrypoint), submission_id=args.submission_id,
        runtime_env=runtime_env, metadata=_json_object("--metadata-json", args.metadata_json),
        entrypoint_num_cpus=args.entrypoint_num_cpus,
        entrypoint_num_gpus=args.entrypoint_num_gpus,
        entrypoint_memory=args.entrypoint_memory,
        entrypoint_resources=_json_object("--entrypoint-resources", args.entrypoint_resources),
        max_retries=args.max_retries)
    print(f"Job '{job_id}' submitted successfully")
    if args.no_wait:
        print(f"Query the status of the job: meshray job status {job_id}")
        print(f"Request the job to be stopped: meshray job stop {job_id}")
        print(f"Query the logs of the job: meshray job logs {job_id}")
        return 0
    _follow(client, job_id)
    return _report(client, job_id)


def _report(client, job_id: str) -> int:
    info = client.get_job_info(job_id)
    print(f"Job '{job_id}' {info.status.value.lower()}: {info.message or ''}".rstrip())
    return 0 if info.status.value == "SUCCEEDED" else 1


def _cmd_status(args) -> int:
    info = _client(args).get_job_info(args.job_id)
    print(f"Status for job '{args.job_id}': {info.status.value}")
    if info.message:
        print(f"Status message: {info.message}")
    if info.job_id:
        driver = info.driver_info or {}
        print(f"Driver: job id {info.job_id}, pid {driver.get('pid')} on "
              f"{driver.get('node_ip_address')}")
    return 0


def _cmd_logs(args) -> int:
    client = _client(args)
    if args.follow:
        _follow(client, args.job_id)
    else:
        sys.stdout.write(client.get_job_logs(args.job_id))
    return 0


def _cmd_stop(args) -> int:
    client = _client(args)
    stopped = client.stop_job(args.job_id)
    print(f"Job '{args.job_id}' {'stop requested' if stopped else 'was not running'}")
    if args.no_wait or not stopped:
        return 0
    deadline = time.monotonic() + args.timeout
    while not client.get_job_status(args.job_id).is_terminal():
        if time.monotonic() > deadline:
            print(f"Job '{args.job_id}' did not stop within {args.timeout:.0f}s",
                  file=sys.stderr)
            return 1
        time.sleep(0.2)
    _report(client, args.job_id)
    return 0


def _cmd_list(args) -> int:
    jobs = _client(args).list_jobs()
    print(f"{'submission_id':<30} {'status':<10} {'job_id':<10} entrypoint")
    for job in jobs:
        print(f"{job.submission_id:<30} {job.status.value:<10} {job.job_id or '-':<10} "
              f"{job.entrypoint}")
    return 0


def _cmd_delete(args) -> int:
    deleted = _client(args).delete_job(args.job_id)
    print(f"Job '{args.job_id}' {'deleted successfully' if deleted else 'was not deleted'}")
    return 0 if deleted else 1


def add_parser(commands) -> None:
    job = commands.add_parser("job", help="submit and manage jobs (Ray's job CLI)")
    sub = job.add_subparsers(dest="job_command", required=True)

    def command(name: str, func, help_text: str, with_id: bool = True):
        parser = sub.add_parser(name, help=help_text)
        parser.add_argument("--address", help="http(s)://host:port of a node's HTTP API "
                            "(default: MESHRAY_ADDRESS/RAY_ADDRESS, else the node on this machine)")
        parser.add_argument("--no-verify", action="store_true",
                            help="do not check the HTTPS server's certificate")
        if with_id:
            parser.add_argument("job_id", help="the job's submission id")
        parser.set_defaults(func=func)
        return parser

    submit = command("submit", _cmd_submit, "run an entrypoint shell command as a job",
                     with_id=False)
    submit.add_argument("--submission-id", "--job-id", dest="submission_id")
    submit.add_argument("--runtime-env-json", help="runtime_env as a JSON object")
    submit.add_argument("--working-dir", help="runtime_env working_dir: a local directory, "
                        "packaged and uploaded to the node (or a meshray-pkg:// URI)")
    submit.add_argument("--metadata-json", help="metadata as a JSON object of strings")
    submit.add_argument("--entrypoint-num-cpus", type=float)
    submit.add_argument("--entrypoint-num-gpus", type=float)
    submit.add_argument("--entrypoint-memory", type=int)
    submit.add_argument("--entrypoint-resources", help="custom resources as a JSON object")
    submit.add_argument("--max-retries", type=int, default=None,
                        help="run again elsewhere up to N times when the supervisor's node dies")
    submit.add_argument("--no-wait", action="store_true",
                        help="return after submitting instead of following the logs")
    submit.add_argument("entrypoint", nargs=argparse.REMAINDER,
                        help="the shell command, after --")
    command("status", _cmd_status, "show a job's status")
    logs = command("logs", _cmd_logs, "print a job's logs")
    logs.add_argument("--follow", "-f", action="store_true", help="follow until the job ends")
    stop = command("stop", _cmd_stop, "stop a job")
    stop.add_argument("--no-wait", action="store_true", help="do not wait for it to stop")
    stop.add_argument("--timeout", type=float, default=60.0)
    command("list", _cmd_list, "list the cluster's jobs", with_id=False)
    command("delete", _cmd_delete, "delete a finished job's record")
