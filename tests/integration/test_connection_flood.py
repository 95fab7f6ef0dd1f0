"""A flood of idle, unauthenticated connections does not take a node down.

The cluster runs in a driver subprocess whose open-file limit is 1024 (soft
and hard, inherited by its daemon and workers), so a bounded flood -- a few
thousand loopback sockets from this test process that connect and never send
a byte -- is more than the daemon or an actor could hold without limits
(without them every descriptor goes, and a new actor never answers). The flood comes from other loopback addresses (127.0.0.2,
127.0.0.3) so the per-peer cap can be told apart from the per-listener one:
an authenticated client from 127.0.0.1 must still get a connection.
"""
from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys

import pytest

from meshray.rpc.factory import make_channel
from meshray.rpc.generated import meshray_pb2 as pb
from meshray.rpc.generated import meshray_pb2_grpc as pb_grpc
from tests.helpers import REPO, wait_for

FLOOD = 3000
LIMIT = 1024
PER_PEER = 128          # limits_for(1024): 512 per listener, a quarter of that per peer

pytestmark = pytest.mark.timeout(240)

DRIVER = f"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, ({LIMIT}, {LIMIT}))
import meshray as ray
from meshray.core.state import state
ray.init(num_cpus=1)
node = state.local_node
print(json.dumps({{"address": node.address, "pid": node.pid, "session": node.session_dir,
                  "token": state.core.token}}), flush=True)

@ray.remote(num_cpus=0)
class Echo:
    def pid(self):
        import os
        return os.getpid()

actors = []
for line in sys.stdin:
    if line.strip() == "actor":
        actor = Echo.remote()
        pid = ray.get(actor.pid.remote(), timeout=60)
        info = state.core.request("actor_info", {{"actor_id": actor._actor_id.hex()}})
        actors.append(actor)
        print(json.dumps({{"pid": pid, "address": info["address"]}}), flush=True)
    elif line.strip() == "call":
        print(json.dumps({{"pid": ray.get(actors[0].pid.remote(), timeout=60)}}), flush=True)
ray.shutdown()
"""


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _flood(source: str, address: str, count: int) -> list[socket.socket]:
    host, port = address.rsplit(":", 1)
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sockets.append(sock)
        sock.bind((source, 0))
        sock.setblocking(False)
        try:
            sock.connect((host, int(port)))
        except BlockingIOError:
            pass
    return sockets


def _read_text(path) -> str:
    try:
        with open(path, errors="replace") as handle:
            return handle.read()
    except FileNotFoundError:
        return ""


@pytest.fixture
def driver(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * FLOOD + 256
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"the flood needs {need} open files in this process; the hard limit "
                        f"is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    stderr_path = tmp_path / "driver.stderr"
    with open(stderr_path, "wb") as stderr:
        process = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=REPO, text=True,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
    try:
        line = process.stdout.readline()
        assert line, _read_text(stderr_path)
        yield process, json.loads(line), stderr_path
    finally:
        process.stdin.close()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


def _ask(process, command: str) -> dict:
    process.stdin.write(command + "\n")
    process.stdin.flush()
    line = process.stdout.readline()
    assert line, f"driver gave no answer to {command!r}"
    return json.loads(line)


def test_idle_flood_leaves_daemon_and_actors_working(driver):
    process, info, driver_stderr = driver
    node_log = os.path.join(info["session"], "node.log")
    flood = []
    try:
        # 1. The daemon's TCP port, from one peer address.
        flood += _flood("127.0.0.2", info["address"], FLOOD)
        wait_for(lambda: "from 127.0.0.2 to port" in _read_text(node_log), timeout=30,
                 message="the daemon logs that it cut 127.0.0.2 down to the per-peer limit")
        line = next(text for text in _read_text(node_log).splitlines() if "from 127.0.0.2" in text)
        assert f"at most {PER_PEER} connections (MESHRAY_MAX_CONNECTIONS_PER_PEER={PER_PEER})" \
            in line
        assert _open_fds(info["pid"]) < LIMIT
        # Another peer still gets a connection, and the token still works on it.
        with make_channel(info["address"], token=info["token"], tls=None) as channel:
            reply = pb_grpc.NodeServiceStub(channel).GetNodeInfo(pb.NodeInfoRequest(),
                                                                 timeout=20)
        assert reply.node_id
        # A new actor (a new worker, new sockets and pipes in the daemon) starts and answers.
        actor = _ask(process, "actor")
        assert actor["pid"] > 0

        # 2. That actor's own server, from a second peer address.
        tcp = next(a for a in actor["address"].split(",") if a and not a.startswith("unix:"))
        flood += _flood("127.0.0.3", tcp, FLOOD)
        wait_for(lambda: "from 127.0.0.3 to port" in _read_text(driver_stderr), timeout=30,
                 message="the actor's log (forwarded to the driver) names 127.0.0.3")
        assert _open_fds(actor["pid"]) < LIMIT
        assert _ask(process, "call")["pid"] == actor["pid"]
        assert _ask(process, "actor")["pid"] != actor["pid"]
        assert _open_fds(info["pid"]) < LIMIT
    finally:
        for sock in flood:
            sock.close()
