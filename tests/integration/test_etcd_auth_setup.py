"""`meshray etcd-credentials --enable-auth`: an etcd the operator runs (the
Kubernetes manifests' etcd) gets the user members derive from the token, and
auth on, so anonymous clients are refused; a second run changes nothing."""
from __future__ import annotations

import os
import sys
from contextlib import closing

import pytest

from meshray import security
from meshray.coordination.client import Coordinator
from meshray.coordination.errors import AuthError
from tests.helpers import run_python

TOKEN = "k8s-setup-token-" + "x" * 24


def _setup(endpoint: str, token_file: str, timeout: float = 30):
    return run_python(["-m", "meshray.cli.main", "etcd-credentials", "--token-file", token_file,
                       "--enable-auth", endpoint, "--timeout", str(timeout)],
                      env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_enable_auth_turns_on_the_derived_login_once(etcd, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    first = _setup(etcd.endpoint, str(token_file))
    assert first.returncode == 0, first.stderr
    assert "etcd auth enabled for user 'root'" in first.stdout

    login = security.etcd_client_options(token=TOKEN, environ={})
    with closing(Coordinator([etcd.endpoint], timeout=5, **login)) as member:
        member.put("/k8s-setup-probe", b"1")
    with closing(Coordinator([etcd.endpoint], timeout=5)) as anonymous, \
            pytest.raises(AuthError):
        anonymous.get("/k8s-setup-probe")

    again = _setup(etcd.endpoint, str(token_file))
    assert again.returncode == 0 and "already enabled" in again.stdout

    other = tmp_path / "other"
    other.write_text("another-cluster-token-" + "y" * 20)
    other.chmod(0o600)
    refused = _setup(etcd.endpoint, str(other))
    assert refused.returncode == 1
    assert "refuses user 'root'" in refused.stderr


def test_enable_auth_gives_up_at_its_deadline_naming_the_endpoint(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    result = _setup("127.0.0.1:1", str(token_file), timeout=1)
    assert result.returncode == 1
    assert "gave up after 1s" in result.stderr and "127.0.0.1:1" in result.stderr
