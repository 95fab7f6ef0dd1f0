"""TLS material for meshray's gRPC listeners and channels.

The cluster token authenticates callers, but over plain TCP both the token
and every pickled payload cross the network readable by anyone on the path.
TLS closes that gap: it encrypts the TCP listeners, lets a caller check it is
talking to a cluster member (the certificate chains to the cluster CA), and
optionally (``client_auth``) makes the server demand a certificate from the
caller too, so a stolen token alone no longer gets anyone in.

Configuration travels in environment variables as well as in objects because
a node daemon starts worker processes (which serve actors and dial peers) and
those must use the same TLS settings as the daemon without each spawn site
threading them through by hand: :meth:`TlsConfig.to_env` and
:meth:`TlsConfig.from_env` are the two ends of that inheritance.

Unix-socket listeners stay plaintext on purpose: they live in a 0700 session
directory and never leave the machine; the token is still checked on them.
"""
from __future__ import annotations

import logging
import os
import ssl
import stat
from dataclasses import dataclass, field
from typing import Mapping

import grpc

__all__ = [
    "ENV_CA",
    "ENV_CERT",
    "ENV_CLIENT_AUTH",
    "ENV_KEY",
    "ENV_SERVER_NAME",
    "TLS_FROM_ENV",
    "TlsConfig",
    "resolve_tls",
]

log = logging.getLogger(__name__)

ENV_CERT = "MESHRAY_TLS_CERT"
ENV_KEY = "MESHRAY_TLS_KEY"
ENV_CA = "MESHRAY_TLS_CA"
ENV_CLIENT_AUTH = "MESHRAY_TLS_CLIENT_AUTH"
ENV_SERVER_NAME = "MESHRAY_TLS_SERVER_NAME"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}
_warned_key_modes: set[str] = set()


class _FromEnv:
    """Sentinel default of the factory's ``tls=`` arguments.

    A sentinel rather than ``None`` so that ``tls=None`` can still mean
    "plaintext, whatever the environment says" (tests, loopback-only tools)
    while the default picks up what the node was started with.
    """

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "TLS_FROM_ENV"

    def __reduce__(self):
        return (_FromEnv, ())


TLS_FROM_ENV = _FromEnv()


def _read_pem(path: str, what: str, marker: str) -> bytes:
    """Read one PEM file now, so a typo fails at startup with its name."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"TlsConfig {what}={path!r} must be a path to a PEM file")
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ValueError(f"TlsConfig {what}={str(path)!r} cannot be read: {exc.strerror}") from None
    if marker.encode() not in data:
        raise ValueError(f"TlsConfig {what}={str(path)!r} is not a PEM file containing "
                         f"'{marker}' (expected {what} material in PEM format)")
    return data


def _warn_if_key_exposed(path: str) -> None:
    """A private key others can read is as good as published; say so once."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO) and path not in _warned_key_modes:
        _warned_key_modes.add(path)
        log.warning("TLS private key %s is readable by group/others (mode %o); "
                    "chmod 600 it", path, stat.S_IMODE(mode))


@dataclass(frozen=True)
class TlsConfig:
    """Where this process's TLS identity and trust roots live, and how strict to be.

    ``cert``/``key``: this process's certificate chain and private key (PEM).
    Servers need them; a channel sends them when the server asks
    (mutual TLS). ``ca``: the CA bundle that peers' certificates must chain
    to; ``None`` means the system roots, which is rarely what a private
    cluster wants. ``client_auth``: servers reject callers without a
    certificate signed by ``ca``. ``server_name``: the name channels expect
    in the server's certificate instead of the dialled host -- nodes dial
    each other by IP, which a shared cluster certificate cannot list, so the
    compose setup issues one certificate for the name ``meshray`` and sets
    this to it.

    Files are read when the object is built so a wrong path or a non-PEM file
    fails immediately and names itself, not on the first connection.
    """

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    client_auth: bool = False
    server_name: str | None = None
    _cert_pem: bytes | None = field(default=None, init=False, repr=False, compare=False)
    _key_pem: bytes | None = field(default=None, init=False, repr=False, compare=False)
    _ca_pem: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if (self.cert is None) != (self.key is None):
            raise ValueError(f"TlsConfig needs cert and key together, got cert={self.cert!r} "
                             f"and key={self.key!r}")
        if self.cert is None and self.ca is None:
            raise ValueError("TlsConfig needs at least a CA (ca=) or a certificate and key "
                             "(cert=, key=); got neither")
        if self.client_auth and self.ca is None:
            raise ValueError("TlsConfig client_auth=True needs ca= (the CA that client "
                             "certificates must chain to)")
        if not isinstance(self.client_auth, bool):
            raise ValueError(f"TlsConfig client_auth={self.client_auth!r} must be a bool")
        if self.server_name is not None and (not isinstance(self.server_name, str)
                                             or not self.server_name.strip()):
            raise ValueError(f"TlsConfig server_name={self.server_name!r} must be a non-empty "
                             "host name or None")
        if self.cert is not None:
            object.__setattr__(self, "_cert_pem", _read_pem(self.cert, "cert", "CERTIFICATE"))
            object.__setattr__(self, "_key_pem", _read_pem(self.key, "key", "PRIVATE KEY"))
            _warn_if_key_exposed(str(self.key))
        if self.ca is not None:
            object.__setattr__(self, "_ca_pem", _read_pem(self.ca, "ca", "CERTIFICATE"))

    # ---------------------------------------------------------------- env
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "TlsConfig | None":
        """The TLS settings this process inherited, or None when TLS is off.

        Off means none of the MESHRAY_TLS_* path variables is set; setting
        only some of them is an error, because silently falling back to
        plaintext is exactly what someone who asked for TLS must not get.
        """
        env = os.environ if environ is None else environ
        cert = env.get(ENV_CERT) or None
        key = env.get(ENV_KEY) or None
        ca = env.get(ENV_CA) or None
        if cert is None and key is None and ca is None:
            return None
        flag = (env.get(ENV_CLIENT_AUTH) or "").strip().lower()
        if flag in _TRUE:
            client_auth = True
        elif flag in _FALSE:
            client_auth = False
        else:
            raise ValueError(f"{ENV_CLIENT_AUTH}={env.get(ENV_CLIENT_AUTH)!r} must be one of "
                             "1/true/yes/on or 0/false/no/off")
        try:
            return cls(cert=cert, key=key, ca=ca, client_auth=client_auth,
                       server_name=env.get(ENV_SERVER_NAME) or None)
        except ValueError as exc:
            raise ValueError(f"TLS settings from the environment ({ENV_CERT}, {ENV_KEY}, "
                             f"{ENV_CA}, {ENV_CLIENT_AUTH}, {ENV_SERVER_NAME}) are invalid: "
                             f"{exc}") from None

    def to_env(self) -> dict[str, str]:
        """Variables that make a child process's from_env() rebuild this config.

        Paths are made absolute because children may run in another cwd
        (runtime_env working_dir).
        """
        env = {ENV_CLIENT_AUTH: "1" if self.client_auth else "0"}
        for name, value in ((ENV_CERT, self.cert), (ENV_KEY, self.key), (ENV_CA, self.ca)):
            if value is not None:
                env[name] = os.path.abspath(value)
        if self.server_name:
            env[ENV_SERVER_NAME] = self.server_name
        return env

    # ---------------------------------------------------------------- grpc
    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials for a listener; a server without its own key pair is a config error."""
        if self._cert_pem is None:
            raise ValueError("TlsConfig without cert= and key= cannot serve TLS; give the "
                             "node a certificate (see scripts/gen_certs.py)")
        return grpc.ssl_server_credentials(
            [(self._key_pem, self._cert_pem)], root_certificates=self._ca_pem,
            require_client_auth=self.client_auth)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self._ca_pem,
                                            private_key=self._key_pem,
                                            certificate_chain=self._cert_pem)

    def channel_options(self) -> list[tuple[str, str]]:
        if self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name)]
        return []

    # ---------------------------------------------------------------- raw sockets
    def ssl_server_context(self) -> ssl.SSLContext:
        """The same identity and client-certificate rule for a raw listener
        (the data link, rpc/data_link.py)."""
        if self.cert is None:
            raise ValueError("TlsConfig without cert= and key= cannot serve TLS; give the "
                             "node a certificate (see scripts/gen_certs.py)")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key)
        if self.ca is not None:
            context.load_verify_locations(cafile=self.ca)
        if self.client_auth:
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def ssl_client_context(self) -> ssl.SSLContext:
        """Trust roots and (for mutual TLS) this process's certificate, for a raw connection."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.ca is not None:
            context.load_verify_locations(cafile=self.ca)
        else:
            context.load_default_certs()
        if self.cert is not None:
            context.load_cert_chain(self.cert, self.key)
        return context


def resolve_tls(tls) -> TlsConfig | None:
    """Turn a factory ``tls=`` argument into a config or None (plaintext)."""
    if tls is TLS_FROM_ENV:
        return TlsConfig.from_env()
    if tls is None or isinstance(tls, TlsConfig):
        return tls
    raise TypeError(f"tls={tls!r} must be a TlsConfig, None (plaintext) or TLS_FROM_ENV "
                    "(the MESHRAY_TLS_* environment)")
