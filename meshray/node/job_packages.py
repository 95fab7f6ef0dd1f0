"""Packages a job client uploads (``working_dir``, ``py_modules``), kept in etcd.

A job may run on any node, be retried on another after its supervisor's node
died, and must outlive the node its submission went to; etcd is the one store
every node reaches and that outlives any of them. So an upload is checked
(hash, member paths, no links, unpacked size: runtime_env/packaging.py
``verify_package``), split into chunks under etcd's request limit, and
written chunks first, record last: a package whose record exists is complete.

etcd is small (its quota is shared by the whole cluster), so uploads have a
cap of their own (``MESHRAY_JOB_PACKAGE_MAX_SIZE``, 32 MiB by default) and so
does their total (``MESHRAY_JOB_PACKAGES_MAX_TOTAL``, 128 MiB). A package is
kept while a job record names it; one that no record names is collected once
it is older than ``UNUSED_GRACE_S`` (an upload gets that long to be submitted).

What is read back is not trusted: node env setup unpacks it only if it
matches the hash its URI names.
"""
from __future__ import annotations

import hashlib
import os
import time
from meshray.coordination import keyspace
from meshray.node.job_records import EtcdStore
from meshray.runtime_env.packaging import PackageError, parse_uri, uris_in, verify_package
from meshray.runtime_env.validation import PACKAGE_URI_SCHEME, parse_size

__all__ = ["CHUNK_BYTES", "JobPackageStore", "MAX_SIZE_ENV", "MAX_TOTAL_ENV",
           "PackageTooLarge", "UNUSED_GRACE_S", "max_package_bytes", "max_total_bytes",
           "unreferenced", "uri_of"]

MAX_SIZE_ENV = "MESHRAY_JOB_PACKAGE_MAX_SIZE"
MAX_TOTAL_ENV = "MESHRAY_JOB_PACKAGES_MAX_TOTAL"
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_TOTAL = 128 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024          # under etcd's 1.5 MiB request limit, with the seal
UNUSED_GRACE_S = 600.0


class PackageTooLarge(PackageError):
    """An upload over the cap of one package or of all of them (answered 413)."""


def max_package_bytes(environ=None) -> int:
    raw = (os.environ if environ is None else environ).get(MAX_SIZE_ENV)
    return DEFAULT_MAX_BYTES if not raw else parse_size(raw, MAX_SIZE_ENV)


def max_total_bytes(environ=None) -> int:
    raw = (os.environ if environ is None else environ).get(MAX_TOTAL_ENV)
    return DEFAULT_MAX_TOTAL if not raw else parse_size(raw, MAX_TOTAL_ENV)


def uri_of(protocol: str, name: str) -> str:
    """The package URI of an upload route's (protocol, package name); PackageError if bad."""
    if protocol + "://" != PACKAGE_URI_SCHEME:
        raise PackageError(f"protocol={protocol!r}: expected {PACKAGE_URI_SCHEME[:-3]!r} "
                           "(meshray's package URIs)")
    uri = PACKAGE_URI_SCHEME + name
    parse_uri(uri)
    return uri


def unreferenced(packages: dict, records: list, now_ms: int, grace_s: float) -> list:
    """Names of packages no job record names and older than `grace_s` (pure).

    `packages` maps name -> its record ({"created_ms", ...}).
    """
    named = set()
    for record in records:
        env = record.get("runtime_env") if isinstance(record, dict) else None
        if isinstance(env, dict):
            named.update(uri[len(PACKAGE_URI_SCHEME):] for uri in uris_in(env))
    out = []
    for name, meta in packages.items():
        created = meta.get("created_ms") if isinstance(meta, dict) else None
        old = not isinstance(created, int) or now_ms - created > grace_s * 1000
        if name not in named and old:
            out.append(name)
    return out


class JobPackageStore(EtcdStore):
    """Uploaded packages (blocking: never on the event loop)."""

    @staticmethod
    def _name(uri: str) -> str:
        parse_uri(uri)
        return uri[len(PACKAGE_URI_SCHEME):]

    def exists(self, uri: str) -> bool:
        return self._client().get(self.keys.job_package(self._name(uri)))[0] is not None

    def sizes(self) -> dict:
        """name -> record of every stored package."""
        items, _revision = self._client().get_prefix(self.keys.job_packages_prefix())
        out = {}
        for item in items:
            try:
                parsed = self.keys.parse(item[0])
                if parsed.family == "job_packages":
                    out[parsed.parts[0]] = keyspace.decode_json(item[1])
            except ValueError:
                continue                   # not a record we wrote: leave it alone
        return out

    def put(self, uri: str, data: bytes) -> bool:
        """Check and store `data` as `uri`; False when it was stored already.

        PackageError when the bytes are not that package or not safe to
        unpack; PackageTooLarge over a cap.
        """
        name = self._name(uri)
        cap = max_package_bytes()
        if len(data) > cap:
            raise PackageTooLarge(f"package {uri} is {len(data)} bytes, over the {cap}-byte "
                                  f"limit of an uploaded package ({MAX_SIZE_ENV})")
        verify_package(uri, data, max_bytes=cap)
        if self.exists(uri):
            return False
        total = sum(int(m.get("size", 0)) for m in self.sizes().values() if isinstance(m, dict))
        if total + len(data) > max_total_bytes():
            raise PackageTooLarge(
                f"package {uri} ({len(data)} bytes) would bring the cluster's uploaded packages "
                f"to {total + len(data)} bytes, over the {max_total_bytes()}-byte limit "
                f"({MAX_TOTAL_ENV}); delete finished jobs to free their packages")
        client = self._client()
        chunks = max(1, -(-len(data) // CHUNK_BYTES))
        for index in range(chunks):
            client.put(self.keys.job_package_chunk(name, index),
                       data[index * CHUNK_BYTES:(index + 1) * CHUNK_BYTES])
        meta = {"size": len(data), "chunks": chunks, "sha256": hashlib.sha256(data).hexdigest(),
                "created_ms": int(time.time() * 1000)}
        client.put(self.keys.job_package(name), keyspace.encode_json(meta))
        return True

    def get(self, uri: str) -> bytes:
        """The bytes of `uri`; KeyError when it was not uploaded (or was collected)."""
        name = self._name(uri)
        client = self._client()
        raw, _revision = client.get(self.keys.job_package(name))
        if raw is None:
            raise KeyError(f"package {uri} was not uploaded to this cluster (or was deleted)")
        meta = keyspace.decode_json(raw)
        items, _revision = client.get_prefix(self.keys.job_package_chunks_prefix(name))
        data = b"".join(bytes(item[1]) for item in items)
        if len(items) != meta.get("chunks") or hashlib.sha256(data).hexdigest() != meta.get(
                "sha256"):
            raise PackageError(f"package {uri}: its stored chunks are incomplete or changed")
        return data

    def delete(self, name: str) -> None:
        """Record first, so a half-deleted package is never seen as complete."""
        client = self._client()
        client.delete(self.keys.job_package(name))
        client.delete_prefix(self.keys.job_package_chunks_prefix(name))
