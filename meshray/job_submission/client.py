"""`JobSubmissionClient`: Ray's client of the job REST API, over urllib.

The address is ``http(s)://host:port`` of any node's HTTP API; without one,
MESHRAY_ADDRESS / RAY_ADDRESS when they hold an http(s) URL, else the node
running on this machine (its record in the run dir names its port). The
cluster token comes from MESHRAY_TOKEN / MESHRAY_TOKEN_FILE, else from the
local node's session dir, as for ``meshray.init(address="auto")``, and is
sent as ``Authorization: Bearer``.

A local ``working_dir`` or ``py_modules`` directory (and a local pip file)
in a job's runtime_env is packaged here, on the client's machine, uploaded to
the node with ``PUT /api/packages/meshray-pkg/<name>`` (skipped when ``GET``
finds it stored) and replaced by its URI, so the job can run on any node.
"""
from __future__ import annotations

import asyncio
import json
import os
import ssl
import urllib.error
import urllib.request
from typing import AsyncIterator
from urllib.parse import quote

from meshray.job_submission.models import JobDetails, JobStatus

__all__ = ["JobSubmissionClient", "resolve_address"]

DEFAULT_TIMEOUT_S = 30.0


def _local_record():
    from meshray._api import _find_local_node
    record, _refused = _find_local_node(None)
    return record


def resolve_address(address: str | None) -> tuple[str, dict | None]:
    """(base URL, the local node record used or None) for a client address."""
    if address in (None, "", "auto"):
        env = os.environ.get("MESHRAY_ADDRESS") or os.environ.get("RAY_ADDRESS") or ""
        if env.startswith(("http://", "https://")):
            return env.rstrip("/"), None
        record = _local_record()
        if record is None or not record.get("dashboard_port"):
            raise ConnectionError(
                "Could not find a meshray node with an HTTP API on this machine; pass "
                "address='http://<node host>:<dashboard port>' (meshray status shows it) "
                "or start a node with `meshray start`.")
        host = record.get("address", "127.0.0.1").rsplit(":", 1)[0]
        scheme = record.get("dashboard_scheme", "http")
        return f"{scheme}://{host}:{record['dashboard_port']}", record
    if not isinstance(address, str):
        raise TypeError(f"address={address!r}: expected a string like 'http://127.0.0.1:8265'")
    if "://" not in address:
        address = "http://" + address
    if not address.startswith(("http://", "https://")):
        raise ValueError(f"address={address!r}: expected an http:// or https:// URL of a "
                         "node's HTTP API")
    return address.rstrip("/"), None


def _find_token(record) -> str | None:
    from meshray import security
    token = security.resolve_token()
    if token:
        return token
    from meshray._api import _read_token
    if record is None:
        record = _local_record()
    return _read_token(record)


class JobSubmissionClient:
    """Submit and manage jobs through a node's HTTP API (Ray's class and methods)."""

    def __init__(self, address: str | None = None, create_cluster_if_needed: bool = False,
                 cookies: dict | None = None, metadata: dict | None = None,
                 headers: dict | None = None, verify: bool | str = True, *,
                 token: str | None = None, timeout: float = DEFAULT_TIMEOUT_S):
        if create_cluster_if_needed:
            raise ValueError("create_cluster_if_needed=True: meshray's job client never starts "
                             "a cluster; start one with `meshray start`")
        self._address, record = resolve_address(address)
        self._default_metadata = dict(metadata or {})
        self._headers = dict(headers or {})
        if cookies:
            self._headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
        if token is None and "Authorization" not in self._headers:
            token = _find_token(record)
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._timeout = timeout
        self._ssl = self._ssl_context(verify) if self._address.startswith("https://") else None

    @staticmethod
    def _ssl_context(verify):
        from meshray.rpc.tls import ENV_CA, ENV_SERVER_NAME
        if verify is False:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        cafile = verify if isinstance(verify, str) else os.environ.get(ENV_CA) or None
        context = ssl.create_default_context(cafile=cafile)
        if os.environ.get(ENV_SERVER_NAME):
            # Nodes are dialled by address while certificates name the cluster:
            # the chain is still checked against the cluster CA.
            context.check_hostname = False
        return context

    def get_address(self) -> str:
        return self._address

    # ------------------------------------------------------------ http
    def _request(self, method: str, path: str, body=None, timeout: float | None = None, *,
                 raw: bytes | None = None):
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json", **self._headers}
        if data is not None:
            headers["Content-Type"] = ("application/octet-stream" if raw is not None
                                       else "application/json")
        request = urllib.request.Request(self._address + path, data=data, method=method,
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout or self._timeout,
                                        context=self._ssl) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            text = exc.read().decode("utf-8", "replace")
            try:
                text = json.loads(text).get("error", text)
            except (ValueError, AttributeError):
                pass
            raise RuntimeError(f"Request failed with status code {exc.code}: {text}.") from None
        except urllib.error.URLError as exc:
            raise ConnectionError(f"Failed to connect to the job API at {self._address}: "
                                  f"{exc.reason}") from None

    @staticmethod
    def _id(job_id: str) -> str:
        if not isinstance(job_id, str) or not job_id:
            raise ValueError(f"job_id={job_id!r}: expected a submission id string")
        return quote(job_id, safe="")

    def _upload_packages(self, runtime_env: dict | None) -> dict:
        """`runtime_env` with its local paths uploaded and replaced by package URIs.

        A path that is missing, too big (MESHRAY_JOB_PACKAGE_MAX_SIZE) or not
        allowed (a remote URI) raises ValueError here, naming the field.
        """
        if not runtime_env:
            return {}
        from meshray.node.job_packages import MAX_SIZE_ENV, max_package_bytes
        from meshray.runtime_env import upload_plan
        env, plan = upload_plan(runtime_env, max_bytes=max_package_bytes(),
                                limit_env=MAX_SIZE_ENV)
        for package in plan:
            path = "/api/packages/meshray-pkg/" + quote(package.uri[len("meshray-pkg://"):],
                                                         safe="")
            try:
                self._request("GET", path)
                continue                       # stored already (by this or another client)
            except RuntimeError as exc:
                if "status code 404" not in str(exc):
                    raise
            self._request("PUT", path, raw=package.data,
                          timeout=self._timeout + len(package.data) / (1 << 20))
        return env or {}

    # ------------------------------------------------------------ Ray's methods
    def submit_job(self, *, entrypoint: str, job_id: str | None = None,
                   runtime_env: dict | None = None, metadata: dict | None = None,
                   submission_id: str | None = None,
                   entrypoint_num_cpus: float | None = None,
                   entrypoint_num_gpus: float | None = None,
                   entrypoint_memory: int | None = None,
                   entrypoint_resources: dict | None = None,
                   max_retries: int | None = None) -> str:
        """Submit `entrypoint`; returns its submission id. `max_retries` (beyond
        Ray): runs again elsewhere when the supervisor's node dies."""
        if job_id is not None and submission_id is not None:
            raise ValueError("job_id and submission_id are the same thing; pass one")
        body = {"entrypoint": entrypoint, "submission_id": submission_id or job_id,
                "runtime_env": self._upload_packages(runtime_env),
                "metadata": {**self._default_metadata, **(metadata or {})},
                "entrypoint_num_cpus": entrypoint_num_cpus,
                "entrypoint_num_gpus": entrypoint_num_gpus,
                "entrypoint_memory": entrypoint_memory,
                "entrypoint_resources": entrypoint_resources}
        if max_retries is not None:
            body["max_retries"] = max_retries
        return self._request("POST", "/api/jobs/", body)["submission_id"]

    def stop_job(self, job_id: str) -> bool:
        return bool(self._request("POST", f"/api/jobs/{self._id(job_id)}/stop")["stopped"])

    def delete_job(self, job_id: str) -> bool:
        return bool(self._request("DELETE", f"/api/jobs/{self._id(job_id)}")["deleted"])

    def get_job_info(self, job_id: str) -> JobDetails:
        return JobDetails.from_dict(self._request("GET", f"/api/jobs/{self._id(job_id)}"))

    def list_jobs(self) -> list[JobDetails]:
        return [JobDetails.from_dict(item) for item in self._request("GET", "/api/jobs/")]

    def get_job_status(self, job_id: str) -> JobStatus:
        return self.get_job_info(job_id).status

    def get_job_logs(self, job_id: str) -> str:
        return self._request("GET", f"/api/jobs/{self._id(job_id)}/logs")["logs"]

    def get_version(self) -> str:
        return self._request("GET", "/api/version")["version"]

    def tail_lines(self, job_id: str, wait: float = 10.0):
        """Blocking generator of the log as it grows, until the job ends (long poll)."""
        offset = 0
        while True:
            reply = self._request(
                "GET", f"/api/jobs/{self._id(job_id)}/logs/tail?offset={offset}&wait={wait}",
                timeout=wait + self._timeout)
            offset = reply["next_offset"]
            if reply["data"]:
                yield reply["data"]
            if reply["done"]:
                return

    async def tail_job_logs(self, job_id: str) -> AsyncIterator[str]:
        """Async iterator of log chunks until the job is terminal (Ray's method)."""
        chunks = self.tail_lines(job_id)
        done = object()
        while True:
            chunk = await asyncio.to_thread(next, chunks, done)
            if chunk is done:
                return
            yield chunk
