"""Another local user gets nothing from a node: the threat-model row of
docs/security.md, tested as a real unprivileged uid.

The tests run as root; the attacker runs as uid 65534 ('nobody') through
``setpriv`` with the system Python and its standard library only (the test
venv may sit in a directory that user cannot enter, as an attacker's tools
would not be meshray's). It tries what hostile testing tried: read and write
etcd without credentials (its HTTP gateway, no client library needed), read
the token file, enter the session directory, connect to the daemon's unix
socket, open object-store files and planted-record paths.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from meshray import security

TOKEN = security.generate_token()
NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a probe as another uid"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux setpriv"),
    pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason="needs a system python3"),
    pytest.mark.meshray_init(num_cpus=1, _token=TOKEN, log_to_driver=False),
]

PROBE = r'''
import base64, json, os, socket, sys, urllib.request, urllib.error
cfg = json.loads(sys.argv[1])
out = {"uid": os.getuid()}

def b64(text):
    return base64.b64encode(text.encode()).decode()

def etcd(path, body):
    request = urllib.request.Request(f"http://{cfg['etcd']}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return {"status": reply.status, "body": reply.read().decode(errors="replace")[:400]}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "body": exc.read().decode(errors="replace")[:400]}
    except OSError as exc:
        return {"status": None, "body": repr(exc)}

prefix = "/meshray/v1/"
out["etcd_read"] = etcd("/v3/kv/range", {"key": b64(prefix), "range_end": b64(prefix[:-1] + "0")})
out["etcd_write"] = etcd("/v3/kv/put", {"key": b64(prefix + "nodes/" + "f" * 32),
                                        "value": b64('{"Address": "127.0.0.1:1"}')})

def attempt(name, action):
    try:
        action()
        out[name] = "allowed"
    except PermissionError:
        out[name] = "denied"
    except OSError as exc:
        out[name] = f"error: {exc!r}"

attempt("token_file", lambda: open(cfg["token_file"]).read())
attempt("session_dir", lambda: os.listdir(cfg["session_dir"]))
def unix_connect():
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(cfg["unix_socket"])
    finally:
        s.close()
attempt("unix_socket", unix_connect)
attempt("store_dir", lambda: os.listdir(cfg["store_dir"]))
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def stored_object(ray):
    """An object in the node's store, so there is a file a probe could read."""
    @ray.remote
    def make_object():
        return b"x" * (2 << 20)     # large enough to live in the store as a file

    ref = make_object.remote()
    ray.get(ref)
    return ref


def _probe(config: dict) -> dict:
    result = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         SYSTEM_PYTHON, "-I", "-c", PROBE, json.dumps(config)],
        capture_output=True, text=True, timeout=60, cwd="/")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_another_local_user_gets_nothing(local_node, stored_object):
    node = local_node
    unix_socket = node.local_address[len("unix:"):]
    token_file = os.path.join(node.session_dir, "token")
    assert os.path.exists(token_file) and os.path.exists(unix_socket)
    out = _probe({"etcd": node.etcd.split(",")[0], "token_file": token_file,
                  "session_dir": node.session_dir, "unix_socket": unix_socket,
                  "store_dir": node.info["store_dir"]})
    assert out["uid"] == NOBODY
    # etcd answers, but not to someone without credentials.
    for what in ("etcd_read", "etcd_write"):
        reply = out[what]
        assert reply["status"] is not None, f"etcd unreachable, probe proves nothing: {reply}"
        # A served request carries a "header" with the store revision; a refused one does not.
        assert '"header"' not in reply["body"], f"{what} succeeded without credentials: {reply}"
        assert "user name is empty" in reply["body"] or "permission denied" in reply["body"] \
            or "invalid auth" in reply["body"], f"{what}: {reply}"
    for what in ("token_file", "session_dir", "unix_socket", "store_dir"):
        assert out[what] == "denied", f"{what}: {out[what]}"
