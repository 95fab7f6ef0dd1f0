"""Where a meshray process gets its secrets from, and how it keeps them secret.

Three secrets matter to a cluster: the cluster token (it authenticates every
gRPC call; whoever holds it can run code on every node), the TLS material
for gRPC (see :mod:`meshray.rpc.tls`) and the etcd credentials (client
certificate and/or user/password). This module is the one place that reads
them from flags, environment variables and files, so precedence and error
messages are the same for ``meshray start``, the node daemon, drivers and
the docker image.

Precedence for the token: an explicit ``--token`` or ``--token-file`` (never
both), then ``MESHRAY_TOKEN``, then ``MESHRAY_TOKEN_FILE``. Files are
preferred in docs because values on a command line are visible to every user
of the machine through ``ps``; environment variables are visible only to the
same user (and root).
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import stat
import tempfile
import threading
import time
from typing import Mapping

__all__ = [
    "ETCD_ENV",
    "ETCD_ROOT_USER",
    "derive_key",
    "etcd_password",
    "MIN_TOKEN_LENGTH",
    "TOKEN_ENV",
    "TOKEN_FD_ENV",
    "TOKEN_FILE_ENV",
    "environment_without_token",
    "etcd_client_options",
    "etcd_options_to_env",
    "forget_token_environment",
    "generate_token",
    "join_hint",
    "load_session_tls",
    "process_token",
    "read_token_file",
    "resolve_token",
    "save_session_tls",
    "token_pipe",
    "validate_token",
    "write_private_file",
    "write_token_file",
]

log = logging.getLogger(__name__)

TOKEN_ENV = "MESHRAY_TOKEN"
TOKEN_FILE_ENV = "MESHRAY_TOKEN_FILE"
MIN_TOKEN_LENGTH = 16
"""Shorter tokens are refused: the token is the only thing between the
network and running code on every node, so it must not be guessable."""

# Coordinator keyword -> environment variable.
ETCD_ENV = {
    "ca_cert": "MESHRAY_ETCD_CA",
    "cert_cert": "MESHRAY_ETCD_CERT",
    "cert_key": "MESHRAY_ETCD_KEY",
    "user": "MESHRAY_ETCD_USER",
    "password": "MESHRAY_ETCD_PASSWORD",
}
ETCD_PASSWORD_FILE_ENV = "MESHRAY_ETCD_PASSWORD_FILE"
ETCD_ROOT_USER = "root"
"""The etcd user a cluster member logs in as when it derives its etcd
credentials from the cluster token (the embedded etcd has only this user)."""
_SESSION_TLS_FILE = "tls.json"
# Mount points whose modes the operator does not control (docker/compose
# and Kubernetes secrets are 0444 by default); no point warning about them.
_MANAGED_SECRET_DIRS = ("/run/secrets/", "/var/run/secrets/")


def generate_token() -> str:
    """A fresh cluster token: 256 random bits, URL-safe, no padding or spaces."""
    return secrets.token_urlsafe(32)


def derive_key(token: str, purpose: str) -> bytes:
    """A 256-bit key for one `purpose`, derived from the cluster token.

    Every secret a member needs (the keys that prove membership on a call,
    the key that signs etcd records, the embedded etcd's password) is
    derived from the one token, each under its own label, so a value made
    for one purpose is useless for another (a call proof cannot be replayed
    as a record signature) and learning a derived value reveals nothing of
    the token. HMAC-SHA256 with the token as key is a standard key
    derivation for a high-entropy secret (HKDF's expand step with one block).
    """
    from meshray.rpc.auth import derive_key as derive

    validate_token(token)
    if not purpose or not isinstance(purpose, str):
        raise ValueError(f"purpose={purpose!r} must be a non-empty string naming the key's use")
    return derive(token, purpose)


def validate_token(token, source: str = "token") -> str:
    """Return `token` if it is usable, else raise naming where it came from.

    Usable means printable ASCII without whitespace (it travels as gRPC
    metadata, and a stray space would never match a stripped file) and at
    least MIN_TOKEN_LENGTH characters.
    """
    if not isinstance(token, str):
        raise TypeError(f"{source} must be a string, got {type(token).__name__}")
    if not token:
        raise ValueError(f"{source} is empty; expected a cluster token "
                         f"(generate one with `python -c \"import meshray.security as s; "
                         f"print(s.generate_token())\"`)")
    if not all(0x21 <= ord(ch) <= 0x7E for ch in token):
        raise ValueError(f"{source} contains spaces or non-printable/non-ASCII characters; "
                         "a cluster token must be printable ASCII without whitespace")
    if len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(f"{source} is {len(token)} characters long; a cluster token needs at "
                         f"least {MIN_TOKEN_LENGTH} (use meshray.security.generate_token())")
    return token


def _warn_if_exposed(path: str, what: str) -> None:
    real = os.path.realpath(path)
    if any(real.startswith(d) or path.startswith(d) for d in _MANAGED_SECRET_DIRS):
        return
    try:
        mode = os.stat(real).st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s %s is readable by group/others (mode %o); anyone who can read it can "
                    "run code on the cluster -- chmod 600 it", what, path, stat.S_IMODE(mode))


def read_token_file(path: str | os.PathLike) -> str:
    """Read a token file written by `meshray start`, a secret store or `echo`.

    Surrounding whitespace (the newline `echo` adds) is dropped; anything
    else that makes the token unusable is an error naming the file.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="ascii", errors="strict") as handle:
            token = handle.read(4096).strip()
    except FileNotFoundError:
        raise ValueError(f"token file {path!r} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"token file {path!r} is a directory, expected a file") from None
    except UnicodeDecodeError:
        raise ValueError(f"token file {path!r} is not ASCII text") from None
    except OSError as exc:
        raise ValueError(f"token file {path!r} cannot be read: {exc.strerror}") from None
    _warn_if_exposed(path, "token file")
    return validate_token(token, f"token file {path!r}")


def resolve_token(token: str | None = None, token_file: str | os.PathLike | None = None, *,
                  environ: Mapping[str, str] | None = None) -> str | None:
    """The cluster token from flags or environment, or None when none is given.

    `token`/`token_file` are the values of ``--token``/``--token-file``;
    giving both is an error (which one would you mean?). The environment is
    consulted only when neither flag is given.
    """
    env = os.environ if environ is None else environ
    if token and token_file:
        raise ValueError("--token and --token-file were both given; pass the cluster token "
                         "one way only")
    if token:
        return validate_token(token, "--token")
    if token_file:
        return read_token_file(token_file)
    if env.get(TOKEN_ENV):
        return validate_token(env[TOKEN_ENV], TOKEN_ENV)
    if env.get(TOKEN_FILE_ENV):
        return read_token_file(env[TOKEN_FILE_ENV])
    return None


def write_private_file(path: str | os.PathLike, data: str | bytes, *, mode: int = 0o600) -> str:
    """Write `data` to `path` readable by its owner only (or `mode`), atomically.

    The content goes to a fresh mkstemp file (created 0600 whatever the
    umask, so the secret is never briefly world-readable) that then replaces
    `path`; replacing swaps a symlink at `path` rather than writing through
    it, so a planted link cannot redirect the secret.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".meshray-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def write_token_file(path: str | os.PathLike, token: str) -> str:
    """Store the cluster token at `path` (mode 0600), newline-terminated."""
    validate_token(token)
    return write_private_file(path, token + "\n")


def join_hint(etcd: str, token_path: str) -> str:
    """What `meshray start` prints so another machine can join this cluster."""
    return ("To add another node to this cluster, copy the token file to that machine "
            "(keep it mode 0600) and run:\n"
            f"  meshray start --address {etcd} --token-file {token_path} --host <this-host-ip>\n"
            f"or pass it through the environment: MESHRAY_TOKEN=$(cat {token_path}) "
            f"meshray start --address {etcd} ...")


# ------------------------------------------------- the token inside a process
TOKEN_FD_ENV = "MESHRAY_TOKEN_FD"
_TOKEN_VARIABLES = (TOKEN_ENV, TOKEN_FILE_ENV, TOKEN_FD_ENV)
_HANDOVER_LIMIT = 4096
_HANDOVER_TIMEOUT_S = 10.0
_process_token_lock = threading.Lock()
_process_token: list = []          # [token or None] once known


def environment_without_token(environ: Mapping[str, str]) -> dict:
    """A copy of `environ` for a child process, with every way to the token removed.

    Workers run user code, and an environment is the most widely copied
    thing a process has: every subprocess that code starts inherits it, and
    it ends up in crash reports and ``env`` dumps. meshray children get the
    token through token_pipe() instead.
    """
    return {key: value for key, value in environ.items() if key not in _TOKEN_VARIABLES}


def token_pipe(token: str) -> int:
    """The read end of a pipe that holds `token` and nothing else will be written to.

    Pass it to one child (``pass_fds`` plus ``MESHRAY_TOKEN_FD=<fd>`` in its
    environment), then close it here. The write end is closed before this
    returns, so the child reads the token and then end-of-file; the token
    fits the pipe buffer, so writing never waits for the child.
    """
    data = validate_token(token).encode("ascii")
    if len(data) > _HANDOVER_LIMIT:
        raise ValueError(f"token is {len(data)} bytes long; at most {_HANDOVER_LIMIT} can be "
                         "handed to a child process")
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, data)
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return read_fd


def _read_handover(value: str) -> str:
    from meshray.common.fd_wait import wait_readable

    if not value.isdigit():
        raise ValueError(f"{TOKEN_FD_ENV}={value!r} must be a file descriptor number")
    fd = int(value)
    try:
        deadline = time.monotonic() + _HANDOVER_TIMEOUT_S
        data = b""
        while len(data) <= _HANDOVER_LIMIT:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not wait_readable(fd, remaining):
                raise TimeoutError(f"no cluster token arrived on {TOKEN_FD_ENV}={fd} within "
                                   f"{_HANDOVER_TIMEOUT_S:.0f}s")
            chunk = os.read(fd, _HANDOVER_LIMIT + 1)
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise ValueError(f"cannot read the cluster token from {TOKEN_FD_ENV}={fd}: "
                         f"{exc.strerror}") from None
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    try:
        token = data.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"the token handed over on {TOKEN_FD_ENV} is not ASCII") from None
    return validate_token(token, f"token handed over on {TOKEN_FD_ENV}")


def process_token() -> str | None:
    """The cluster token of this process, or None when it runs without one.

    A process meshray starts (a node daemon, a worker) finds it on the pipe
    named by MESHRAY_TOKEN_FD, reads it once and closes the pipe; otherwise
    it comes from MESHRAY_TOKEN / MESHRAY_TOKEN_FILE as for any command. The
    answer is kept, so every later caller in the process gets the same token
    without the pipe, or the variable, still being around.
    """
    with _process_token_lock:
        if not _process_token:
            handover = os.environ.pop(TOKEN_FD_ENV, None)
            _process_token.append(_read_handover(handover) if handover is not None
                                  else resolve_token())
        return _process_token[0]


def forget_token_environment() -> None:
    """Drop the token variables from this process's environment (children inherit it)."""
    for name in _TOKEN_VARIABLES:
        os.environ.pop(name, None)


# ---------------------------------------------------------------------- etcd
def etcd_password(token: str) -> str:
    """The etcd password of a cluster whose token is `token`.

    Derived rather than stored, so every holder of the token -- nodes joining
    with ``--address``, drivers, the CLI -- logs in to the cluster's etcd with
    no further secret to distribute, and the password is worthless for
    anything but etcd. Hex keeps it printable and shell-safe (no leading '-'
    for etcdctl to mistake for a flag).
    """
    return derive_key(token, "etcd-password").hex()


def etcd_client_options(*, ca_cert: str | None = None, cert_cert: str | None = None,
                        cert_key: str | None = None, user: str | None = None,
                        password: str | None = None, password_file: str | None = None,
                        token: str | None = None,
                        environ: Mapping[str, str] | None = None) -> dict:
    """Keyword arguments for ``Coordinator(endpoints, **options)``.

    Explicit values (CLI flags) win over MESHRAY_ETCD_* variables. Pairs that
    only work together (certificate and key; user and password) are checked
    here so the error names the flags and variables, not the client's
    parameters. Given the cluster `token` and no explicit password, the
    credentials are derived from it (user ``root`` unless a user is named,
    password :func:`etcd_password`); an etcd without auth ignores them.
    Empty result = plaintext, anonymous etcd.

    With the cluster `token`, the options also carry the key that seals and
    checks every record (``record_key``, see
    :mod:`meshray.coordination.seal`): a member refuses records that no
    member wrote. It is not an etcd credential and never leaves the process.
    """
    env = os.environ if environ is None else environ
    options = {}
    for name, value in (("ca_cert", ca_cert), ("cert_cert", cert_cert), ("cert_key", cert_key),
                        ("user", user)):
        value = value or env.get(ETCD_ENV[name]) or None
        if value is not None:
            options[name] = value
    if password and password_file:
        raise ValueError("--etcd-password and --etcd-password-file were both given; use one")
    if not (password or password_file):
        if env.get(ETCD_ENV["password"]) and env.get(ETCD_PASSWORD_FILE_ENV):
            raise ValueError(f"{ETCD_ENV['password']} and {ETCD_PASSWORD_FILE_ENV} are both "
                             "set; use one")
        password = env.get(ETCD_ENV["password"]) or None
        password_file = env.get(ETCD_PASSWORD_FILE_ENV) or None
    if password:
        options["password"] = password
    elif password_file:
        try:
            with open(password_file) as handle:
                options["password"] = handle.read().rstrip("\r\n")
        except OSError as exc:
            raise ValueError(f"etcd password file {password_file!r} cannot be read: "
                             f"{exc.strerror}") from None
        _warn_if_exposed(password_file, "etcd password file")
    if token and "password" not in options:
        options.setdefault("user", ETCD_ROOT_USER)
        options["password"] = etcd_password(token)
    if ("cert_cert" in options) != ("cert_key" in options):
        raise ValueError("etcd client certificate and key go together: give both "
                         "--etcd-cert/MESHRAY_ETCD_CERT and --etcd-key/MESHRAY_ETCD_KEY, "
                         f"got only {'the certificate' if 'cert_cert' in options else 'the key'}")
    if ("user" in options) != ("password" in options):
        raise ValueError("etcd user and password go together: give --etcd-user/"
                         "MESHRAY_ETCD_USER and --etcd-password(-file)/MESHRAY_ETCD_PASSWORD"
                         "(_FILE), got only "
                         f"{'the user' if 'user' in options else 'the password'}")
    for name in ("ca_cert", "cert_cert", "cert_key"):
        if name in options and not os.path.isfile(options[name]):
            raise ValueError(f"etcd {name.replace('_', ' ')} file {options[name]!r} "
                             f"({ETCD_ENV[name]}) does not exist")
    if token:
        options["record_key"] = derive_key(token, "records")
    return options


def etcd_options_to_env(options: Mapping[str, str], token: str | None = None) -> dict[str, str]:
    """The environment that makes a child's etcd_client_options() return `options`.

    File paths are made absolute, since the child may run elsewhere. A
    password derived from `token` is left out (with the default user): the
    child derives it from the token it gets anyway, and a secret in the
    environment is inherited by every process the child starts.
    """
    env = {}
    derived = token is not None and options.get("password") == etcd_password(token)
    for name, value in options.items():
        if name == "record_key":   # derived from the token, which children get separately
            continue
        if derived and (name == "password" or (name == "user" and value == ETCD_ROOT_USER)):
            continue
        if name not in ETCD_ENV:
            raise ValueError(f"unknown etcd option {name!r}; expected one of {sorted(ETCD_ENV)}")
        env[ETCD_ENV[name]] = (os.path.abspath(value) if name in ("ca_cert", "cert_cert",
                                                                  "cert_key") else value)
    return env


# ------------------------------------------------------- TLS for local drivers
def save_session_tls(session_dir: str | os.PathLike, tls) -> str | None:
    """Record the node's TLS settings (paths, not keys) in its session dir.

    A driver that joins with ``init(address=...)`` finds the node through its
    session dir and must dial remote actors and nodes with the same TLS
    settings; this file is how it learns them. None removes the record.
    """
    path = os.path.join(os.fspath(session_dir), _SESSION_TLS_FILE)
    if tls is None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return None
    return write_private_file(path, json.dumps(tls.to_env(), sort_keys=True))


def load_session_tls(session_dir: str | os.PathLike):
    """The TlsConfig saved by save_session_tls, or None when the node runs plaintext."""
    from meshray.common.private_files import read_file_in_private_dir
    from meshray.rpc.tls import TlsConfig

    session_dir = os.fspath(session_dir)
    path = os.path.join(session_dir, _SESSION_TLS_FILE)
    try:
        # Checked like every file a driver takes from a session dir: settings
        # planted by another user could point it at their CA.
        env = json.loads(read_file_in_private_dir(session_dir, _SESSION_TLS_FILE,
                                                  what="node TLS settings"))
    except FileNotFoundError:
        return None
    except PermissionError:
        raise
    except (OSError, ValueError) as exc:
        raise ValueError(f"node TLS settings {path!r} are unreadable: {exc}") from None
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                            for k, v in env.items()):
        raise ValueError(f"node TLS settings {path!r} are not a JSON object of strings")
    return TlsConfig.from_env(env)
