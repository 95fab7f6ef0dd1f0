"""Turning on etcd's own authentication for a member meshray runs itself.

An etcd without auth answers every local user: whoever can write it can
plant node and actor records and so make meshray processes dial them. The
members meshray starts (the embedded etcd of ``meshray.init()`` and
``meshray start``, the test and chaos clusters) therefore run with auth
enabled: one ``root`` user with the root role, whose password is derived from
the cluster token (:func:`meshray.security.etcd_password`).

This module speaks to a member over its HTTP JSON gateway, like the rest of
:mod:`.embedded`, through a ``request(path, body) -> (status, body)``
callable, so the same steps run over TCP or over the private unix socket a
fresh member is set up on, and the decisions can be tested without etcd.
"""

from __future__ import annotations

import http.client
import json
from typing import Callable

__all__ = ["EtcdAuthError", "login_outcome", "enable_root_auth", "exchange_json",
           "gateway_request"]

ROOT_ROLE = "root"

Request = Callable[[str, dict], "tuple[int, dict]"]


class EtcdAuthError(RuntimeError):
    """A member's auth could not be set up, or is set up for other credentials.

    ``retryable`` is False only when trying again cannot help: auth is on
    and refuses these credentials.
    """

    def __init__(self, message: str, *, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


def _message(body: dict) -> str:
    return str(body.get("error") or body.get("message") or body)


def login_outcome(status: int, body: dict) -> str:
    """Classify the answer to a login (``/v3/auth/authenticate``).

    ``"ok"`` (auth is on and the credentials work), ``"disabled"`` (auth is
    off: set it up), ``"rejected"`` (auth is on but not for these
    credentials) or ``"error"`` (anything else, e.g. no leader yet).
    """
    if status == 200 and body.get("token"):
        return "ok"
    message = _message(body).lower()
    if "authentication is not enabled" in message:
        return "disabled"
    if "invalid user id or password" in message or "authentication failed" in message:
        return "rejected"
    return "error"


def _check(what: str, answer: tuple[int, dict], *, tolerate: tuple[str, ...] = ()) -> str:
    status, body = answer
    if status == 200:
        return ""
    message = _message(body)
    if any(marker in message for marker in tolerate):
        return message
    raise EtcdAuthError(f"etcd refused to {what}: HTTP {status}: {message}")


def enable_root_auth(request: Request, user: str, password: str, where: str) -> bool:
    """Make ``user`` (role root) log in with ``password`` and turn auth on.

    Idempotent: a member that already accepts these credentials is left
    alone (a restart on the same data dir). Returns True when this call
    turned auth on. Raises :class:`EtcdAuthError` when auth is on for other
    credentials (the data dir belongs to a cluster with another token) or a
    step fails.
    """
    login = {"name": user, "password": password}
    status, body = request("/v3/auth/authenticate", login)
    outcome = login_outcome(status, body)
    if outcome == "ok":
        return False
    if outcome == "rejected":
        raise EtcdAuthError(
            f"etcd at {where} has auth enabled but refuses user {user!r} with the password "
            f"derived from this cluster's token ({_message(body)}); its data belongs to a "
            f"cluster with another token", retryable=False)
    if outcome != "disabled":
        raise EtcdAuthError(f"etcd at {where} did not answer a login: HTTP {status}: "
                            f"{_message(body)}")
    exists = _check(f"add user {user!r}", request("/v3/auth/user/add", login),
                    tolerate=("user name already exists",))
    if exists:      # left by an interrupted setup: make its password ours
        _check(f"set the password of {user!r}", request("/v3/auth/user/changepw", login))
    _check(f"grant role {ROOT_ROLE!r} to {user!r}",
           request("/v3/auth/user/grant", {"user": user, "role": ROOT_ROLE}))
    _check("enable auth", request("/v3/auth/enable", {}))
    status, body = request("/v3/auth/authenticate", login)
    if login_outcome(status, body) != "ok":
        raise EtcdAuthError(f"etcd at {where} enabled auth but refuses the login it was set "
                            f"up with: HTTP {status}: {_message(body)}")
    return True


def gateway_request(endpoint: str, timeout: float) -> Request:
    """A ``request`` for the JSON gateway of the member at ``host:port``
    (plain HTTP: a member that demands TLS from clients is set up with
    etcdctl instead, docs/kubernetes.md)."""
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"etcd endpoint {endpoint!r}: expected HOST:PORT")

    def request(path: str, body: dict) -> tuple[int, dict]:
        conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)
        return exchange_json(conn, "POST", path, json.dumps(body).encode())
    return request


def exchange_json(conn: http.client.HTTPConnection, method: str, path: str,
                  body: bytes | None) -> tuple[int, dict]:
    """(status, JSON answer or {}) of one request on `conn`, which it closes."""
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        answer = conn.getresponse()
        data = answer.read()
    finally:
        conn.close()
    try:
        return answer.status, json.loads(data or b"{}")
    except ValueError:
        return answer.status, {}
