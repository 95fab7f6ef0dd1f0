"""Ray's job API on every node: the REST routes, the node questions a job's
supervisor asks, and the watch that keeps jobs from hanging on a dead node.

Any node answers for any job: records are in etcd (node/job_records.py).
Submitting creates the PENDING record, then starts a short-lived launcher
process on this node (``meshray.job_submission.launch``, a meshray driver)
that creates the job's supervisor: a detached actor with the entrypoint's
resources, placed bottom-up like any actor, so the entrypoint runs where
those resources are rather than on the node that was asked. The supervisor
(meshray/job_submission/supervisor.py) moves the record through its
statuses with the ``job_update`` question to its own node, which writes them
by compare-and-swap; only nodes write job records.

Every node scans the records when its view of the members changes (looked at
every ``JANITOR_INTERVAL_S``, without reading etcd), while a suspect is
pending, and every ``FULL_SCAN_INTERVAL_S`` anyway: a job only loses its
supervisor when a node leaves, so reading every job record every second on
every node would cost etcd reads that grow with nodes times jobs for nothing.
A RUNNING job whose supervisor's node has left the cluster (its lease
expired, so its record left this node's view) on two scans in a row is
marked FAILED with the cause, or put back to PENDING and launched again while
``max_retries`` allows. The
change is a compare-and-swap, so when several nodes notice at once exactly
one wins, and only the winner launches the retry.
"""
from __future__ import annotations

import base64
import logging
import os
import subprocess
import sys
import threading
import time

from meshray.node import job_packages as packages, job_records as jobs
from meshray.node.http_api import HttpError, Route
from meshray.runtime_env.packaging import PackageError, uris_in

__all__ = ["JobApi", "SUPERVISOR_NAMESPACE", "supervisor_name"]

log = logging.getLogger(__name__)

SUPERVISOR_NAMESPACE = "_meshray_jobs"
JANITOR_INTERVAL_S = 1.0
FULL_SCAN_INTERVAL_S = 30.0
LAUNCH_TIMEOUT_S = 120.0
TAIL_WAIT_S = 10.0
MAX_LOG_BYTES = 64 << 20
PACKAGE_GC_INTERVAL_S = 60.0
_ID = r"(?P<job_id>[^/]+)"
_PACKAGE = r"/api/packages/(?P<protocol>[^/]+)/(?P<package_name>[^/]+)"
_UPDATE_FIELDS = {"status", "message", "driver_exit_code", "error_type", "job_id"}
_UPDATE_STATUSES = {jobs.RUNNING, jobs.SUCCEEDED, jobs.FAILED, jobs.STOPPED}


def supervisor_name(submission_id: str, attempt: int) -> str:
    return f"_job_supervisor_{submission_id}_{attempt}"


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("meshray")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "unknown"


class JobApi:
    """The daemon's job collaborator (routes, questions, janitor)."""

    def __init__(self, daemon):
        self.daemon = daemon
        self.http = None
        self._stop = threading.Event()
        self._thread = None
        self._launchers: set = set()
        self._suspects: set = set()
        self._last_package_gc = time.monotonic()

    # ------------------------------------------------------------ wiring
    def _etcd_store(self, kind):
        membership = self.daemon.membership
        if membership is None:
            raise HttpError(503, "this node is not a cluster member yet")
        return kind(lambda: membership.coordinator, membership.keys)

    @property
    def store(self) -> jobs.JobStore:
        return self._etcd_store(jobs.JobStore)

    @property
    def packages(self) -> packages.JobPackageStore:
        return self._etcd_store(packages.JobPackageStore)

    def routes(self) -> list:
        return [
            Route("GET", r"/api/version", self.get_version),
            Route("POST", r"/api/jobs/?", self.submit),
            Route("GET", r"/api/jobs/?", self.list_jobs),
            Route("GET", rf"/api/jobs/{_ID}", self.get_job),
            Route("DELETE", rf"/api/jobs/{_ID}", self.delete_job),
            Route("GET", rf"/api/jobs/{_ID}/logs", self.get_logs),
            Route("GET", rf"/api/jobs/{_ID}/logs/tail", self.tail_logs),
            Route("POST", rf"/api/jobs/{_ID}/stop", self.stop_job),
            Route("GET", _PACKAGE, self.get_package),
            Route("PUT", _PACKAGE, self.put_package,
                  max_body=packages.max_package_bytes() + (1 << 20)),
        ]

    def questions(self) -> dict:
        """Node questions for a supervisor (local only: asked of its own node)."""
        return {"job_get": self._ask_job_get, "job_update": self._ask_job_update,
                "job_driver": self._ask_job_driver}

    def start(self, http) -> None:
        self.http = http
        self._thread = threading.Thread(target=self._janitor, name="meshray-job-janitor",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        for process in list(self._launchers):
            if process.poll() is None:
                process.kill()
                process.wait()

    # ------------------------------------------------------------ routes
    def get_version(self, request) -> tuple:
        session = os.path.basename(self.daemon.config.session_dir.rstrip("/"))
        return 200, {"version": "4", "ray_version": _version(), "ray_commit": "",
                     "session_name": session}

    def submit(self, request) -> tuple:
        checked = jobs.check_submission(request.json())
        store = self.packages
        for uri in uris_in(checked["runtime_env"]):
            if not store.exists(uri):
                raise HttpError(400, f"runtime_env package {uri} was not uploaded to this "
                                     "cluster: upload it with PUT /api/packages/... first "
                                     "(JobSubmissionClient does) or give a local path")
        submission_id = checked["submission_id"] or jobs.new_submission_id()
        record = jobs.new_record(checked, submission_id=submission_id)
        self.store.create(record)
        self._launch(submission_id, 0)
        return 200, {"job_id": submission_id, "submission_id": submission_id}

    @staticmethod
    def _package_uri(request) -> str:
        from urllib.parse import unquote
        try:
            return packages.uri_of(unquote(request.params["protocol"]),
                                   unquote(request.params["package_name"]))
        except PackageError as exc:
            raise HttpError(400, str(exc)) from None

    def get_package(self, request) -> tuple:
        """Ray's check before an upload: 404 when the package is not stored."""
        uri = self._package_uri(request)
        if not self.packages.exists(uri):
            raise HttpError(404, f"package {uri} is not stored")
        return 200, {"uri": uri, "exists": True}

    def put_package(self, request) -> tuple:
        """Store an uploaded package (checked; see node/job_packages.py)."""
        uri = self._package_uri(request)
        try:
            stored = self.packages.put(uri, request.body)
        except packages.PackageTooLarge as exc:
            raise HttpError(413, str(exc)) from None
        except PackageError as exc:
            raise HttpError(400, f"package {uri} refused: {exc}") from None
        return 200, {"uri": uri, "stored": stored}

    def package_bytes(self, uri: str) -> bytes:
        """An uploaded package's bytes (blocking; for env setup off the loop)."""
        return self.packages.get(uri)

    def list_jobs(self, request) -> tuple:
        return 200, sorted(self.store.list(), key=lambda r: r.get("start_time") or 0)

    def _record(self, submission_id: str) -> dict:
        try:
            return self.store.get(submission_id)[0]
        except jobs.JobNotFoundError as exc:
            raise HttpError(404, str(exc)) from None

    def get_job(self, request) -> tuple:
        return 200, self._record(request.params["job_id"])

    def delete_job(self, request) -> tuple:
        submission_id = request.params["job_id"]
        self._record(submission_id)
        return 200, {"deleted": self.store.delete(submission_id)}

    def stop_job(self, request) -> tuple:
        submission_id = request.params["job_id"]
        record = self._record(submission_id)
        if record["status"] in jobs.TERMINAL:
            return 200, {"stopped": False}

        def change(current: dict) -> dict:
            if current["status"] == jobs.PENDING:
                return {"status": jobs.STOPPED, "message": "Job was intentionally stopped."}
            return {"stop_requested": True}
        try:
            updated = self.store.update(submission_id, change)
        except jobs.InvalidTransition:
            return 200, {"stopped": False}       # it ended meanwhile
        if updated["status"] == jobs.STOPPED:
            self._kill_supervisor(updated)
        return 200, {"stopped": True}

    def get_logs(self, request) -> tuple:
        record = self._record(request.params["job_id"])
        data, _offset, _done = self._read_log(record, 0, MAX_LOG_BYTES)
        return 200, {"logs": data.decode("utf-8", "replace")}

    def tail_logs(self, request) -> tuple:
        """Long poll: the log from `offset` on, waiting up to `wait` seconds for more.

        Answers ``{"data", "next_offset", "done", "status"}``; ``done`` once the
        job is terminal and everything it wrote was returned.
        """
        submission_id = request.params["job_id"]
        try:
            offset = int(request.arg("offset", "0"))
            wait = float(request.arg("wait", str(TAIL_WAIT_S)))
        except ValueError:
            raise HttpError(400, "offset and wait must be numbers") from None
        if offset < 0 or not 0 <= wait <= 60:
            raise HttpError(400, f"offset={offset} must be >= 0 and wait={wait} in 0..60")
        deadline = time.monotonic() + wait
        while True:
            record = self._record(submission_id)
            data, next_offset, done = self._read_log(record, offset, 1 << 20)
            if data or done or time.monotonic() >= deadline or self._stop.is_set():
                return 200, {"data": data.decode("utf-8", "replace"), "next_offset": next_offset,
                             "done": done, "status": record["status"]}
            time.sleep(0.2)

    def _read_log(self, record: dict, offset: int, limit: int) -> tuple[bytes, int, bool]:
        """(bytes from offset, next offset, whether the job is over and all was read)."""
        terminal = record["status"] in jobs.TERMINAL
        node = record.get("driver_node_id")
        if not node:
            return b"", offset, terminal
        out = b""
        while len(out) < limit:
            payload = {"node_id": node, "filename": record["log_file"], "offset": offset,
                       "limit": min(1 << 20, limit - len(out)), "timeout": 10}
            try:
                reply = self.http.on_loop(self.daemon.logs.ask_get(None, payload))
            except (ValueError, TimeoutError):
                return out, offset, terminal   # not written yet, or its node is gone
            chunk = base64.b64decode(reply["data"])
            offset = reply["next_offset"]
            out += chunk
            if not chunk or offset >= reply["size"]:
                return out, offset, terminal
        return out, offset, False

    # ------------------------------------------------------------ supervisor
    def _launch(self, submission_id: str, attempt: int) -> None:
        """Start the launcher that creates the job's supervisor actor."""
        env = dict(os.environ)
        env["MESHRAY_ADDRESS"] = ",".join(self.daemon.config.etcd_endpoints)
        env["MESHRAY_PREFERRED_NODE"] = self.daemon.node_id.hex()
        env.pop("RAY_ADDRESS", None)
        process = subprocess.Popen(
            [sys.executable, "-m", "meshray.job_submission.launch", submission_id, str(attempt)],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, close_fds=True, start_new_session=True)
        self._launchers.add(process)
        threading.Thread(target=self._watch_launcher, args=(process, submission_id, attempt),
                         name=f"meshray-job-launch-{submission_id}", daemon=True).start()

    def _watch_launcher(self, process, submission_id: str, attempt: int) -> None:
        try:
            _out, err = process.communicate(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            _out, err = process.communicate()
        finally:
            self._launchers.discard(process)
        if process.returncode == 0 or self._stop.is_set():
            return
        tail = (err or b"").decode("utf-8", "replace")[-2000:]
        log.warning("job %s: the supervisor launcher exited with %s", submission_id,
                    process.returncode)

        def change(record: dict) -> dict:
            if record["status"] != jobs.PENDING:
                raise jobs.InvalidTransition("the job left PENDING")
            return {"status": jobs.FAILED, "error_type": "JOB_SUPERVISOR_ACTOR_START_FAILURE",
                    "message": f"Failed to start the job supervisor (exit code "
                               f"{process.returncode}): {tail}", "for_attempt": attempt}
        try:
            self.store.update(submission_id, change)
        except (jobs.InvalidTransition, jobs.JobNotFoundError, HttpError):
            pass

    def _kill_supervisor(self, record: dict) -> None:
        """Best effort: a pending supervisor that starts later sees STOPPED and exits."""
        name = supervisor_name(record["submission_id"], record.get("attempt", 0))
        try:
            found = self.http.on_loop(self.daemon.hosting.ask_get_named_actor(
                None, {"namespace": SUPERVISOR_NAMESPACE, "name": name}), timeout=10)
            actor_id = found.get("actor_id")
            if actor_id:
                self.http.on_loop(self.daemon.hosting.ask_kill_actor(
                    None, {"actor_id": actor_id, "no_restart": True,
                           "cause": "the job was stopped before it started"}), timeout=10)
        except Exception as exc:  # noqa: BLE001 - best effort (see docstring)
            log.info("job %s: could not kill its pending supervisor: %s",
                     record["submission_id"], exc)

    # ------------------------------------------------------------ questions
    async def _ask_job_get(self, conn, payload: dict) -> dict:
        submission_id = payload.get("submission_id")
        if not isinstance(submission_id, str):
            raise ValueError(f"submission_id={submission_id!r}: expected a string")
        import asyncio
        record, _revision = await asyncio.get_running_loop().run_in_executor(
            None, self.store.get, submission_id)
        return record

    async def _ask_job_update(self, conn, payload: dict) -> dict:
        """A supervisor reports a status; this node writes it (CAS)."""
        import asyncio
        submission_id = payload.get("submission_id")
        attempt = payload.get("for_attempt")
        if not isinstance(submission_id, str) or isinstance(attempt, bool) \
                or not isinstance(attempt, int):
            raise ValueError(f"submission_id={submission_id!r} and for_attempt={attempt!r}: "
                             "expected a string and a whole number")
        change = {k: v for k, v in payload.items() if k in _UPDATE_FIELDS}
        if change.get("status") not in _UPDATE_STATUSES:
            raise ValueError(f"status={change.get('status')!r}: expected one of "
                             f"{sorted(_UPDATE_STATUSES)}")
        change["for_attempt"] = attempt
        if change["status"] == jobs.RUNNING:
            host = self.daemon._advertised_host()
            change.update(driver_node_id=self.daemon.node_id.hex(),
                          driver_agent_http_address=f"{self.http.scheme}://{host}:"
                                                    f"{self.http.port}")
        record = await asyncio.get_running_loop().run_in_executor(
            None, self.store.update, submission_id, change)
        return {"record": record, "etcd": ",".join(self.daemon.config.etcd_endpoints)}

    async def _ask_job_driver(self, conn, payload: dict) -> dict:
        """The entrypoint's driver connected: record its job id and driver info.

        Ray's JobDetails names the driver of a submitted job. The driver only
        says which submission it belongs to; the job id, the pid and the
        address are what this node knows of the connection, and only a driver
        on the job's own supervisor node may claim it (the first one wins).
        """
        import asyncio
        submission_id = payload.get("submission_id")
        if not isinstance(submission_id, str) or not submission_id:
            raise ValueError(f"submission_id={submission_id!r}: expected a non-empty string")
        if conn is None or conn.role != "driver":
            raise ValueError("job_driver: only a driver connection may name its job")
        change = jobs.driver_change(
            job_hex=conn.job_id.hex(), pid=conn.pid, node_ip=self.daemon._advertised_host(),
            node_hex=self.daemon.node_id.hex())
        try:
            record = await asyncio.get_running_loop().run_in_executor(
                None, self.store.update, submission_id, change)
        except (jobs.InvalidTransition, jobs.JobNotFoundError) as exc:
            return {"recorded": False, "reason": str(exc)}
        conn.submission_id = submission_id
        return {"recorded": True, "job_id": record["job_id"]}

    # ------------------------------------------------------------ janitor
    def _janitor(self) -> None:
        last_live, last_scan = None, float("-inf")
        while not self._stop.wait(JANITOR_INTERVAL_S):
            membership = self.daemon.membership
            if membership is None or not membership.registered:
                continue
            try:
                live = set(membership.view_snapshot()[0]) | {self.daemon.node_id.hex()}
                now = time.monotonic()
                if live != last_live or self._suspects or \
                        now - last_scan >= FULL_SCAN_INTERVAL_S:
                    self._scan(live)
                    last_live, last_scan = live, now
                if now - self._last_package_gc > PACKAGE_GC_INTERVAL_S:
                    self._last_package_gc = now
                    self._collect_packages()
            except Exception as exc:  # noqa: BLE001 - etcd trouble: next scan
                log.warning("job janitor: scan failed: %s", exc)

    def _collect_packages(self) -> None:
        """Delete uploaded packages that no job names any more (see job_packages)."""
        store = self.packages
        stored = store.sizes()
        if not stored:
            return
        for name in packages.unreferenced(stored, self.store.list(), int(time.time() * 1000),
                                          packages.UNUSED_GRACE_S):
            log.info("job packages: deleting %s (no job names it)", name)
            store.delete(name)

    def _scan(self, live: set) -> None:
        suspects = set()
        for record in self.store.list():
            if jobs.lost_supervisor_change(record, live) is None:
                continue
            key = (record["submission_id"], record.get("driver_node_id"), record.get("attempt"))
            suspects.add(key)
            if key not in self._suspects:
                continue          # gone on one scan only: the view may lag; look again
            self._handle_lost(record["submission_id"], live)
        self._suspects = suspects

    def _handle_lost(self, submission_id: str, live: set) -> None:
        def change(record: dict) -> dict:
            decided = jobs.lost_supervisor_change(record, live)
            if decided is None:
                raise jobs.InvalidTransition("the job's supervisor is no longer lost")
            return decided
        try:
            updated = self.store.update(submission_id, change)
        except (jobs.InvalidTransition, jobs.JobNotFoundError):
            return                  # another node won, or the job moved on
        log.warning("job %s: %s", submission_id, updated["message"])
        if updated["status"] == jobs.PENDING:
            self._launch(submission_id, updated["attempt"])
