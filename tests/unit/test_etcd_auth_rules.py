"""The pure parts of etcd auth and supervision: credentials derived from the
token, the auth setup decisions, stale-token detection, restart backoff, and
how a member is spawned (no Python in the child)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from meshray import security
from meshray.common import death_signal
from meshray.coordination import embedded
from meshray.coordination.errors import _auth_not_enabled, _token_stale
from meshray.coordination.etcd_auth import EtcdAuthError, enable_root_auth, login_outcome
from meshray.coordination.supervisor import restart_delay
from meshray.node.membership import retry_delay

TOKEN = "t" * 16 + "-cluster-token"
RECORD_KEY = security.derive_key(TOKEN, "records")   # seals records; not an etcd credential
OTHER = "o" * 16 + "-cluster-token"


# ----------------------------------------------------------- credentials
def test_etcd_password_is_derived_printable_and_per_cluster():
    password = security.etcd_password(TOKEN)
    assert password == security.etcd_password(TOKEN)
    assert password != security.etcd_password(OTHER)
    assert len(password) == 64 and all(c in "0123456789abcdef" for c in password)
    # Its own label: not the token, not a key derived for another purpose.
    assert TOKEN not in password
    assert password != security.derive_key(TOKEN, "record-signing").hex()


def test_token_gives_root_and_the_derived_password():
    options = security.etcd_client_options(token=TOKEN, environ={})
    assert options == {"user": "root", "password": security.etcd_password(TOKEN),
                       "record_key": RECORD_KEY}
    assert security.etcd_client_options(environ={}) == {}


def test_explicit_credentials_win_over_the_token(tmp_path):
    explicit = security.etcd_client_options(user="ops", password="secret", token=TOKEN,
                                            environ={})
    assert explicit == {"user": "ops", "password": "secret", "record_key": RECORD_KEY}
    from_env = security.etcd_client_options(
        token=TOKEN, environ={"MESHRAY_ETCD_USER": "ops", "MESHRAY_ETCD_PASSWORD": "pw"})
    assert from_env == {"user": "ops", "password": "pw", "record_key": RECORD_KEY}
    password_file = tmp_path / "pw"
    security.write_private_file(password_file, "from-file\n")
    assert security.etcd_client_options(user="ops", password_file=str(password_file),
                                        token=TOKEN, environ={})["password"] == "from-file"


def test_a_named_user_without_password_gets_the_derived_password():
    options = security.etcd_client_options(token=TOKEN,
                                           environ={"MESHRAY_ETCD_USER": "meshray"})
    assert options == {"user": "meshray", "password": security.etcd_password(TOKEN),
                       "record_key": RECORD_KEY}


def test_a_password_without_user_is_still_an_error_with_a_token():
    with pytest.raises(ValueError, match="got only the password"):
        security.etcd_client_options(password="pw", token=TOKEN, environ={})


def test_derived_credentials_stay_out_of_a_childs_environment():
    """A child gets the token and derives the password itself; a secret in
    the environment would be inherited by everything it starts."""
    derived = security.etcd_client_options(token=TOKEN, environ={})
    assert security.etcd_options_to_env(derived, token=TOKEN) == {}
    named = security.etcd_client_options(token=TOKEN, environ={"MESHRAY_ETCD_USER": "meshray"})
    assert security.etcd_options_to_env(named, token=TOKEN) == {"MESHRAY_ETCD_USER": "meshray"}
    child = security.etcd_client_options(
        token=TOKEN, environ=security.etcd_options_to_env(named, token=TOKEN))
    assert child == named
    explicit = {"user": "ops", "password": "secret"}
    assert security.etcd_options_to_env(explicit, token=TOKEN) == {
        "MESHRAY_ETCD_USER": "ops", "MESHRAY_ETCD_PASSWORD": "secret"}


def test_bad_token_is_refused_by_name():
    with pytest.raises(ValueError, match="characters long"):
        security.etcd_password("short")


# ------------------------------------------------------------- auth setup
def test_login_outcomes():
    assert login_outcome(200, {"token": "abc.1"}) == "ok"
    assert login_outcome(400, {"error": "etcdserver: authentication is not enabled"}) == \
        "disabled"
    assert login_outcome(400, {"error": "etcdserver: authentication failed, invalid user ID "
                                        "or password"}) == "rejected"
    assert login_outcome(503, {"error": "etcdserver: no leader"}) == "error"
    assert login_outcome(200, {}) == "error"          # no token: not a login


class FakeMember:
    """The gateway answers of an etcd member, enough for the setup steps."""

    def __init__(self, auth=False, users=None):
        self.auth = auth
        self.users = dict(users or {})      # name -> password
        self.roles: dict[str, set] = {}
        self.calls: list[str] = []

    def __call__(self, path, body):
        self.calls.append(path)
        if path == "/v3/auth/authenticate":
            if not self.auth:
                return 400, {"error": "etcdserver: authentication is not enabled"}
            if self.users.get(body["name"]) == body["password"]:
                return 200, {"token": "tok.1"}
            return 400, {"error": "etcdserver: authentication failed, invalid user ID or "
                                  "password"}
        if path == "/v3/auth/user/add":
            if body["name"] in self.users:
                return 400, {"error": "etcdserver: user name already exists"}
            self.users[body["name"]] = body["password"]
            return 200, {}
        if path == "/v3/auth/user/changepw":
            self.users[body["name"]] = body["password"]
            return 200, {}
        if path == "/v3/auth/user/grant":
            self.roles.setdefault(body["user"], set()).add(body["role"])
            return 200, {}
        if path == "/v3/auth/enable":
            if "root" not in self.roles.get("root", set()):
                return 400, {"error": "etcdserver: root user does not have root role"}
            self.auth = True
            return 200, {}
        raise AssertionError(path)


def test_setup_turns_auth_on_once():
    member = FakeMember()
    assert enable_root_auth(member, "root", "pw", "m") is True
    assert member.auth and member.users == {"root": "pw"} and member.roles == {"root": {"root"}}
    member.calls.clear()
    assert enable_root_auth(member, "root", "pw", "m") is False      # a restart: nothing to do
    assert member.calls == ["/v3/auth/authenticate"]


def test_setup_takes_over_a_user_left_by_an_interrupted_setup():
    member = FakeMember(users={"root": "stale"})
    assert enable_root_auth(member, "root", "pw", "m") is True
    assert member.users["root"] == "pw" and "/v3/auth/user/changepw" in member.calls


def test_auth_for_other_credentials_is_a_final_error():
    member = FakeMember(auth=True, users={"root": "another-clusters-password"})
    with pytest.raises(EtcdAuthError, match="another token") as info:
        enable_root_auth(member, "root", "pw", "m")
    assert info.value.retryable is False
    assert member.calls == ["/v3/auth/authenticate"]       # nothing changed


def test_a_failed_step_is_retryable():
    def no_leader(path, body):
        if path == "/v3/auth/authenticate":
            return 400, {"error": "etcdserver: authentication is not enabled"}
        return 503, {"error": "etcdserver: no leader"}
    with pytest.raises(EtcdAuthError, match="no leader") as info:
        enable_root_auth(no_leader, "root", "pw", "m")
    assert info.value.retryable is True


# ------------------------------------------------------- client decisions
@pytest.mark.parametrize("details", [
    "etcdserver: invalid auth token",
    "etcdserver: user name is empty",
    "etcdserver: revision of auth store is old",
])
def test_stale_token_answers_are_cured_by_logging_in(details):
    assert _token_stale(details)


@pytest.mark.parametrize("details", [
    "etcdserver: permission denied",
    "etcdserver: authentication failed, invalid user ID or password",
    "etcdserver: no leader",
])
def test_other_refusals_are_not_stale_tokens(details):
    assert not _token_stale(details)


def test_auth_disabled_answer():
    assert _auth_not_enabled("etcdserver: authentication is not enabled")
    assert not _auth_not_enabled("etcdserver: user name is empty")


# ---------------------------------------------------------------- backoff
def test_restart_delay_is_quick_first_then_backs_off_to_a_cap():
    delays = [restart_delay(n) for n in range(1, 8)]
    assert delays[0] <= 0.1
    assert delays == sorted(delays) and delays[-1] == 10.0
    with pytest.raises(ValueError, match="failures must be >= 1"):
        restart_delay(0)


def test_membership_retry_delay_backs_off_to_a_cap():
    delays = [retry_delay(n) for n in range(1, 12)]
    assert delays[0] == pytest.approx(0.2)
    assert delays == sorted(delays) and delays[-1] == 5.0
    with pytest.raises(ValueError, match="failures must be >= 1"):
        retry_delay(0)


# --------------------------------------------------------- how it spawns
def test_member_is_spawned_through_setpriv_without_preexec(tmp_path, monkeypatch):
    """No Python runs in the child (CPython can vfork; no atfork handler of
    a threaded parent runs there); the death signal comes from setpriv."""
    seen = {}

    class FakePopen:
        pid = 4242

        def __init__(self, argv, **kwargs):
            seen["argv"], seen["kwargs"] = argv, kwargs

        def poll(self):
            return None

    death_signal._setpriv_prefix.cache_clear()
    monkeypatch.setattr(death_signal.shutil, "which",
                        lambda name: "/usr/bin/setpriv" if name == "setpriv" else None)
    monkeypatch.setattr(death_signal.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 0, "--pdeathsig <sig>", ""))
    monkeypatch.setattr(embedded.subprocess, "Popen", FakePopen)
    try:
        member = embedded.EmbeddedEtcd(tmp_path / "m", etcd_bin="/bin/etcd-test")
        member.launch()
    finally:
        death_signal._setpriv_prefix.cache_clear()
    assert seen["argv"][:5] == ["/usr/bin/setpriv", "--pdeathsig", "KILL", "--", "/bin/etcd-test"]
    assert seen["kwargs"].get("preexec_fn") is None
    assert seen["kwargs"]["start_new_session"] is True


def test_without_setpriv_a_python_wrapper_sets_the_death_signal(monkeypatch, caplog):
    death_signal._setpriv_prefix.cache_clear()
    monkeypatch.setattr(death_signal.shutil, "which", lambda name: None)
    try:
        with caplog.at_level(logging.DEBUG, logger="meshray.common.death_signal"):
            prefix = death_signal.death_signal_prefix()
    finally:
        death_signal._setpriv_prefix.cache_clear()
    assert "setpriv not found" in caplog.text
    assert prefix == (sys.executable, "-I", "-S", "-c", death_signal.PYTHON_EXEC_WRAPPER,
                      str(os.getpid()))


def test_private_member_arguments(tmp_path):
    member = embedded.EmbeddedEtcd(tmp_path / "m", client_port=2379, private_peer=True,
                                   auth_password="p" * 64)
    args = member._args("etcd")
    value = {args[i]: args[i + 1] for i in range(1, len(args) - 1) if args[i].startswith("--")}
    assert value["--listen-peer-urls"] == value["--initial-advertise-peer-urls"] == \
        "unix://peer.sock:0"
    assert value["--initial-cluster"] == "meshray=unix://peer.sock:0"
    assert value["--listen-client-urls"] == "http://127.0.0.1:2379"
    assert value["--bcrypt-cost"] == "4"
    setup = member._args("etcd", client_url="unix://setup.sock:0")
    assert "unix://setup.sock:0" in setup and "http://127.0.0.1:2379" not in setup


def test_private_peer_is_for_single_members_only(tmp_path):
    with pytest.raises(ValueError, match="private_peer is for a single member"):
        embedded.EmbeddedEtcd(tmp_path / "m", private_peer=True, peer_port=2380,
                              initial_cluster="a=http://127.0.0.1:2380")
    with pytest.raises(ValueError, match="auth_password must be a non-empty string"):
        embedded.EmbeddedEtcd(tmp_path / "m", auth_password="")
