"""Ray's job API on real clusters: the client, the CLI and raw HTTP, auth, and
jobs whose supervisor's node dies."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from tests.helpers import REPO, wait_for

pytestmark = pytest.mark.cluster_args(initialize_head=True, head_node_args={"num_cpus": 1})

JOB_TIMEOUT_S = 90.0


def api_url(cluster, node=None) -> str:
    node = node or cluster.head_node
    record = wait_for(lambda: cluster.engine.registered().get(node.node_id), timeout=30)
    return f"http://127.0.0.1:{record['DashboardPort']}"


def client_for(cluster, node=None):
    from meshray.job_submission import JobSubmissionClient
    return JobSubmissionClient(api_url(cluster, node), token=cluster.token)


def wait_status(client, job_id, statuses, timeout=JOB_TIMEOUT_S):
    return wait_for(lambda: client.get_job_info(job_id) if client.get_job_status(job_id).value
                    in statuses else None, timeout=timeout,
                    message=f"job {job_id} to reach {statuses}")


def http(method, url, *, body=None, headers=None):
    """(status, parsed JSON body, response headers) of one raw request."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null"), exc.headers


def test_submit_status_logs_list_delete_through_the_client(cluster, tmp_path):
    client = client_for(cluster)
    assert client.get_version() == "4"
    marker = tmp_path / "ran"
    code = ("import meshray; meshray.init(); "
            "print('workers', meshray.get(meshray.remote(lambda: 41 + 1).remote()))")
    job_id = client.submit_job(
        entrypoint=f"echo hello-from-job; touch {marker}; {sys.executable} -c \"{code}\"",
        metadata={"owner": "test"}, runtime_env={"env_vars": {"JOB_FLAG": "x"}})
    info = wait_status(client, job_id, {"SUCCEEDED", "FAILED"})
    assert info.status.value == "SUCCEEDED", info.message
    assert marker.exists()
    assert info.driver_exit_code == 0 and info.end_time >= info.start_time
    assert info.metadata == {"owner": "test"} and info.submission_id == job_id
    logs = client.get_job_logs(job_id)
    assert "hello-from-job" in logs and "workers 42" in logs

    async def tail():
        return "".join([chunk async for chunk in client.tail_job_logs(job_id)])
    assert "hello-from-job" in asyncio.run(tail())
    assert job_id in [job.submission_id for job in client.list_jobs()]
    assert client.delete_job(job_id) is True
    with pytest.raises(RuntimeError, match="404"):
        client.get_job_info(job_id)


def test_a_repeated_submission_id_is_refused_and_runs_once(cluster, tmp_path):
    client = client_for(cluster)
    runs = tmp_path / "runs"
    entrypoint = f"echo run >> {runs}"
    client.submit_job(entrypoint=entrypoint, submission_id="only-once")
    with pytest.raises(RuntimeError, match="already exists"):
        client.submit_job(entrypoint=entrypoint, submission_id="only-once")
    wait_status(client, "only-once", {"SUCCEEDED"})
    assert runs.read_text() == "run\n"


def test_a_failing_entrypoint_is_failed_with_its_exit_code(cluster):
    client = client_for(cluster)
    job_id = client.submit_job(entrypoint="echo about-to-fail; exit 3")
    info = wait_status(client, job_id, {"FAILED", "SUCCEEDED"})
    assert info.status.value == "FAILED"
    assert "exit code 3" in info.message and "about-to-fail" in info.message
    assert info.driver_exit_code == 3 and info.error_type == "JOB_ENTRYPOINT_COMMAND_ERROR"


def test_stop_a_pending_job_and_a_running_one(cluster, tmp_path):
    client = client_for(cluster)
    never = tmp_path / "never"
    pending = client.submit_job(entrypoint=f"touch {never}",
                                entrypoint_resources={"no_node_has_this": 1})
    assert client.get_job_status(pending).value == "PENDING"
    assert client.stop_job(pending) is True
    assert wait_status(client, pending, {"STOPPED"}).status.value == "STOPPED"

    started = tmp_path / "started"
    running = client.submit_job(entrypoint=f"touch {started}; exec sleep 120")
    wait_for(started.exists, timeout=JOB_TIMEOUT_S)
    assert client.get_job_status(running).value == "RUNNING"
    assert client.stop_job(running) is True
    info = wait_status(client, running, {"STOPPED", "FAILED", "SUCCEEDED"}, timeout=30)
    assert info.status.value == "STOPPED"
    assert info.driver_exit_code == -15               # SIGTERM to its process group
    assert client.stop_job(running) is False          # already over
    # A node that could run the stopped job joins: a job needing the same
    # resource runs there, and the stopped one still never does.
    cluster.add_node(num_cpus=1, resources={"no_node_has_this": 1})
    later = client.submit_job(entrypoint="echo later",
                              entrypoint_resources={"no_node_has_this": 1})
    assert wait_status(client, later, {"SUCCEEDED", "FAILED"}).status.value == "SUCCEEDED"
    assert client.get_job_status(pending).value == "STOPPED"
    assert not never.exists()


def test_requests_without_the_token_are_refused_and_run_nothing(cluster, tmp_path):
    url = api_url(cluster)
    marker = tmp_path / "forged"
    body = {"entrypoint": f"touch {marker}", "submission_id": "forged"}
    assert http("POST", f"{url}/api/jobs/", body=body)[0] == 401
    assert http("POST", f"{url}/api/jobs/", body=body,
                headers={"Authorization": "Bearer " + "x" * 43})[0] == 401
    assert http("GET", f"{url}/api/jobs/")[0] == 401
    assert http("POST", f"{url}/login", body={"token": "wrong-token-0123456789"})[0] == 401

    status, answer, headers = http("POST", f"{url}/login", body={"token": cluster.token})
    assert status == 200
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    session = {"Cookie": cookie.split(";")[0]}
    # A cross-site form post carries the cookie but cannot know the CSRF token.
    assert http("POST", f"{url}/api/jobs/", body=body, headers=session)[0] == 403
    assert http("POST", f"{url}/api/jobs/", body=body,
                headers={**session, "X-CSRF-Token": "guess"})[0] == 403
    status, listing, _ = http("GET", f"{url}/api/jobs/", headers=session)
    assert status == 200 and "forged" not in [job["submission_id"] for job in listing]
    assert not marker.exists()

    # The same session with its CSRF token may submit (the browser UI's way).
    ok = {"entrypoint": "echo via-cookie", "submission_id": "cookie-job"}
    status, reply, _ = http("POST", f"{url}/api/jobs/", body=ok,
                            headers={**session, "X-CSRF-Token": answer["csrf_token"]})
    assert status == 200 and reply["submission_id"] == "cookie-job"
    bearer = {"Authorization": f"Bearer {cluster.token}"}
    wait_for(lambda: http("GET", f"{url}/api/jobs/cookie-job", headers=bearer)[1]["status"]
             == "SUCCEEDED", timeout=JOB_TIMEOUT_S)
    status, logs, _ = http("GET", f"{url}/api/jobs/cookie-job/logs", headers=bearer)
    assert status == 200 and "via-cookie" in logs["logs"]


def test_the_cli_submits_follows_lists_and_deletes(cluster):
    url = api_url(cluster)
    env = {**os.environ, "MESHRAY_TOKEN": cluster.token, "PYTHONPATH": REPO}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "meshray.cli.main", "job", *args,
                               "--address", url] if args[0] != "submit" else
                              [sys.executable, "-m", "meshray.cli.main", "job", "submit",
                               "--address", url, *args[1:]],
                              capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    done = cli("submit", "--submission-id", "cli-job", "--metadata-json", '{"a": "b"}',
               "--entrypoint-num-cpus", "0.5", "--", "echo", "cli-output")
    assert done.returncode == 0, done.stderr
    assert "cli-output" in done.stdout and "succeeded" in done.stdout
    assert "SUCCEEDED" in cli("status", "cli-job").stdout
    assert "cli-output" in cli("logs", "cli-job").stdout
    assert "cli-job" in cli("list").stdout
    assert cli("delete", "cli-job").returncode == 0
    assert "cli-job" not in cli("list").stdout


@pytest.mark.parametrize("max_retries", [0, 1])
def test_a_job_whose_supervisor_node_dies(cluster, tmp_path, max_retries):
    first = cluster.add_node(num_cpus=1, resources={"job_slot": 1})
    second = cluster.add_node(num_cpus=1, resources={"job_slot": 1})
    client = client_for(cluster)              # the head: neither supervisor node
    marker = tmp_path / "first-attempt"
    entrypoint = (f"if [ -e {marker} ]; then echo second-attempt; "
                  f"else touch {marker}; exec sleep 120; fi")
    job_id = client.submit_job(entrypoint=entrypoint, entrypoint_resources={"job_slot": 1},
                               max_retries=max_retries)
    wait_for(marker.exists, timeout=JOB_TIMEOUT_S)
    info = wait_status(client, job_id, {"RUNNING"})
    victim = first if info.driver_node_id == first.node_id else second
    assert info.driver_node_id == victim.node_id
    cluster.remove_node(victim, allow_graceful=False)
    info = wait_status(client, job_id, {"FAILED", "SUCCEEDED"}, timeout=60)
    if max_retries == 0:
        assert info.status.value == "FAILED"
        assert victim.node_id in info.message and "supervisor" in info.message
        assert info.error_type == "JOB_SUPERVISOR_ACTOR_DIED"
    else:
        assert info.status.value == "SUCCEEDED", info.message
        assert info.attempt == 1 and info.driver_node_id not in (victim.node_id, None)
        assert "second-attempt" in client.get_job_logs(job_id)


def test_a_job_survives_the_loss_of_the_node_it_was_submitted_to(cluster, tmp_path):
    worker_a = cluster.add_node(num_cpus=1)
    worker_b = cluster.add_node(num_cpus=1, resources={"job_slot": 1})
    go = tmp_path / "go"
    job_id = client_for(cluster, worker_a).submit_job(
        entrypoint=f"while [ ! -e {go} ]; do sleep 0.1; done; echo finished",
        entrypoint_resources={"job_slot": 1})
    client_b = client_for(cluster, worker_b)
    assert wait_status(client_b, job_id, {"RUNNING"}).driver_node_id == worker_b.node_id
    cluster.remove_node(worker_a, allow_graceful=False)
    cluster.wait_for_nodes()
    go.touch()
    assert wait_status(client_b, job_id, {"SUCCEEDED", "FAILED"}).status.value == "SUCCEEDED"
    assert "finished" in client_b.get_job_logs(job_id)


def test_a_jobs_driver_is_named_in_its_details_and_the_state_api(cluster, tmp_path):
    client = client_for(cluster)
    go = tmp_path / "go"
    script = tmp_path / "driver.py"
    script.write_text(
        "import os, time\n"
        "import meshray\n"
        "from meshray.util.state import list_jobs\n"
        "meshray.init()\n"
        "print('job-id', meshray.get_runtime_context().get_job_id(), flush=True)\n"
        "sid = os.environ['RAY_JOB_SUBMISSION_ID']\n"
        "rows = list_jobs(filters=[('submission_id', '=', sid)])\n"
        "print('state-rows', [(row.job_id, row.driver_pid) for row in rows], flush=True)\n"
        f"while not os.path.exists({str(go)!r}):\n"
        "    time.sleep(0.1)\n")
    job_id = client.submit_job(entrypoint=f"exec {sys.executable} {script}")
    info = wait_for(lambda: (lambda i: i if i.job_id else None)(client.get_job_info(job_id)),
                    timeout=JOB_TIMEOUT_S, message="the job's driver to be recorded")
    assert info.status.value == "RUNNING"
    driver = info.driver_info
    assert driver["id"] == info.job_id and driver["node_ip_address"] == "127.0.0.1"
    listed = {job.submission_id: job for job in client.list_jobs()}
    assert listed[job_id].job_id == info.job_id
    assert listed[job_id].driver_info == driver
    go.touch()
    assert wait_status(client, job_id, {"SUCCEEDED", "FAILED"}).status.value == "SUCCEEDED"
    logs = client.get_job_logs(job_id)
    assert f"job-id {info.job_id}" in logs              # the driver's own get_job_id()
    assert f"state-rows [('{info.job_id}', {int(driver['pid'])})]" in logs
    url = api_url(cluster)
    env = {**os.environ, "MESHRAY_TOKEN": cluster.token, "PYTHONPATH": REPO}
    status = subprocess.run([sys.executable, "-m", "meshray.cli.main", "job", "status", job_id,
                             "--address", url], capture_output=True, text=True, timeout=120,
                            env=env, cwd=REPO)
    assert f"job id {info.job_id}, pid {driver['pid']}" in status.stdout, status.stderr
    # An entrypoint that starts no driver leaves both empty, as in Ray.
    plain = client.submit_job(entrypoint="echo no-driver")
    info = wait_status(client, plain, {"SUCCEEDED", "FAILED"})
    assert info.job_id is None and info.driver_info is None


def _project(root):
    """A client-local working_dir and py_modules dir the nodes are not told the path of."""
    proj = root / "proj"
    proj.mkdir()
    (proj / "helper.py").write_text("VALUE = 'from-the-package'\n")
    (proj / "secret.txt").write_text("left out by excludes\n")
    lib = root / "libs" / "mylib"
    lib.mkdir(parents=True)
    (lib / "__init__.py").write_text("NAME = 'mylib-from-py-modules'\n")
    return proj, lib


def test_a_client_local_working_dir_and_py_modules_are_uploaded(cluster, tmp_path):
    import shutil
    cluster.add_node(num_cpus=1, resources={"job_slot": 1})    # not the node asked
    proj, lib = _project(tmp_path)
    go = tmp_path / "go"
    code = ("import os, helper, mylib; print('cwd', os.getcwd()); print(helper.VALUE, "
            "mylib.NAME, 'secret' if os.path.exists('secret.txt') else 'no-secret')")
    client = client_for(cluster)
    job_id = client.submit_job(
        entrypoint=f"while [ ! -e {go} ]; do sleep 0.1; done; {sys.executable} -c \"{code}\"",
        runtime_env={"working_dir": str(proj), "py_modules": [str(lib)],
                     "excludes": ["secret.txt"]},
        entrypoint_resources={"job_slot": 1})
    shutil.rmtree(tmp_path / "proj")          # the nodes can only have it from the upload
    shutil.rmtree(tmp_path / "libs")
    go.touch()
    info = wait_status(client, job_id, {"SUCCEEDED", "FAILED"})
    logs = client.get_job_logs(job_id)
    assert info.status.value == "SUCCEEDED", logs
    assert "from-the-package mylib-from-py-modules no-secret" in logs
    cwd = logs.split("cwd ", 1)[1].split()[0]
    assert not cwd.startswith(str(tmp_path))
    uri = info.runtime_env["working_dir"]
    assert uri.startswith("meshray-pkg://") and uri[len("meshray-pkg://"):] in cwd
    assert info.runtime_env["py_modules"][0].startswith("meshray-pkg://")
    assert info.driver_node_id != cluster.head_node.node_id


def test_the_cli_uploads_its_working_dir(cluster, tmp_path):
    proj, _lib = _project(tmp_path)
    env = {**os.environ, "MESHRAY_TOKEN": cluster.token, "PYTHONPATH": REPO}
    done = subprocess.run(
        [sys.executable, "-m", "meshray.cli.main", "job", "submit", "--address",
         api_url(cluster), "--working-dir", str(proj), "--", "python", "-c",
         "'import helper; print(helper.VALUE)'"],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "from-the-package" in done.stdout and "succeeded" in done.stdout


def test_package_uploads_are_authenticated_and_checked(cluster, tmp_path):
    from meshray.runtime_env import package_directory
    proj, _lib = _project(tmp_path)
    package = package_directory(proj)
    url = api_url(cluster) + "/api/packages/meshray-pkg/" + package.uri[len("meshray-pkg://"):]
    bearer = {"Authorization": f"Bearer {cluster.token}"}

    def put(data, headers):
        request = urllib.request.Request(url, data=data, method="PUT", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    assert put(package.data, {})[0] == 401
    assert put(package.data, {"Authorization": "Bearer " + "x" * 43})[0] == 401
    assert http("GET", url, headers=bearer)[0] == 404         # nothing was stored
    status, answer = put(package.data[:-10] + b"x" * 10, bearer)
    assert status == 400 and "refused" in answer["error"]
    forged = tmp_path / "forged.zip"
    import zipfile
    with zipfile.ZipFile(forged, "w") as zf:
        zf.writestr("../escape.py", "print('escaped')\n")
    status, answer = put(forged.read_bytes(), bearer)
    assert status == 400 and "unsafe path" in answer["error"]
    # A job naming a package that was never uploaded is refused at submission.
    status, answer, _ = http("POST", api_url(cluster) + "/api/jobs/", headers=bearer,
                             body={"entrypoint": "true",
                                   "runtime_env": {"working_dir": package.uri}})
    assert status == 400 and "not uploaded" in answer["error"]
    assert put(package.data, bearer) == (200, {"uri": package.uri, "stored": True})
    assert http("GET", url, headers=bearer)[0] == 200


def test_a_too_big_working_dir_is_refused_on_the_client(cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("MESHRAY_JOB_PACKAGE_MAX_SIZE", "1MiB")
    big = tmp_path / "big"
    big.mkdir()
    (big / "data.bin").write_bytes(os.urandom(2 << 20))
    client = client_for(cluster)
    before = len(client.list_jobs())
    with pytest.raises(ValueError, match="working_dir") as raised:
        client.submit_job(entrypoint="true", runtime_env={"working_dir": str(big)})
    assert "MESHRAY_JOB_PACKAGE_MAX_SIZE" in str(raised.value)
    assert "data.bin" in str(raised.value)
    with pytest.raises(ValueError, match="working_dir.*does not exist"):
        client.submit_job(entrypoint="true", runtime_env={"working_dir": str(tmp_path / "no")})
    with pytest.raises(ValueError, match="remote URIs"):
        client.submit_job(entrypoint="true", runtime_env={"working_dir": "s3://bucket/x.zip"})
    assert len(client.list_jobs()) == before
