"""etcd key layout for meshray: the one place that knows where things live.

Every other component asks this module for keys and prefixes and hands keys
it reads back to a parser here, so the layout can change (a new ``v2`` root,
an extra family) by editing one file. The module is pure: no I/O, no etcd.

Layout (``<root>`` is ``/meshray/v1/``, or ``/<cluster>/meshray/v1/`` for a
named cluster so several clusters can share one etcd and be granted access by
prefix)::

    <root>nodes/<node_id>                  node record         (node lease)
    <root>avail/<node_id>                  resource availability (node lease)
    <root>actors/<actor_id>                actor record
    <root>actor_names/<namespace>/<name>   named-actor claim
    <root>objloc/<object_id>/<node_id>     a copy of an object  (node lease)
    <root>pgs/<pg_id>                      placement group record
    <root>pg_names/<namespace>/<name>      named placement-group claim
    <root>alloc/<node_id>                  placement-group allocations on a node
    <root>jobs/<submission_id>             job record (submitted through the job API)
    <root>job_packages/<name>              a package uploaded by a job client (its size)
    <root>job_package_chunks/<name>/<i>    its bytes, in chunks ``000000``, ``000001``...

Ids appear as lowercase hex. Namespaces and names are percent-encoded so any
string (including ``/``, spaces, unicode, the empty string) round-trips and can
never reach into a neighbouring key. See docs/keyspace.md for what the values
hold and which keys live on a node's lease.
"""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple
from urllib.parse import quote, unquote

__all__ = [
    "ROOT",
    "FAMILIES",
    "DEFAULT",
    "Keyspace",
    "ParsedKey",
    "encode_json",
    "decode_json",
    "id_hex",
    "escape_segment",
    "unescape_segment",
]

ROOT = "/meshray/v1/"

# Family name -> number of path segments after the family.
FAMILIES: dict[str, int] = {
    "nodes": 1,
    "avail": 1,
    "actors": 1,
    "actor_names": 2,
    "objloc": 2,
    "pgs": 1,
    "pg_names": 2,
    "alloc": 1,
    "jobs": 1,
    "job_packages": 1,
    "job_package_chunks": 2,
}
_CHUNK_RE = re.compile(r"^[0-9]{6}$")

_HEX_RE = re.compile(r"^(?:[0-9a-f]{2})+$")
_LOWER_HEX_RE = re.compile(r"[0-9a-f]+")
_CLUSTER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Characters left unescaped in namespaces and names. "/" is never among them.
_SAFE = "-._~"


class ParsedKey(NamedTuple):
    """A key split back into its family and its path segments (ids as hex,
    namespaces and names unescaped)."""

    family: str
    parts: tuple[str, ...]


def id_hex(value: Any, what: str = "id") -> str:
    """Normalise an id to lowercase hex.

    Accepts a hex string, ``bytes``, or any object with a ``hex()`` method
    (the id classes elsewhere in meshray), so callers never hand-format ids
    and a malformed id fails here rather than producing a key nobody parses.
    """
    if isinstance(value, str):
        text = value.lower()
    elif isinstance(value, (bytes, bytearray, memoryview)):
        text = bytes(value).hex()
    elif callable(getattr(value, "hex", None)):
        text = value.hex()
        if not isinstance(text, str):
            raise TypeError(f"{what}: {type(value).__name__}.hex() returned "
                            f"{type(text).__name__}, expected str")
        text = text.lower()
    else:
        raise TypeError(f"{what} must be a hex str, bytes or an object with "
                        f".hex(); got {type(value).__name__}")
    if not _HEX_RE.match(text):
        raise ValueError(f"{what} must be non-empty, even-length hex; "
                         f"got {value!r}")
    return text


def escape_segment(text: str, what: str = "segment") -> str:
    """Percent-encode a free-form string into one key segment (no ``/``)."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be str, got {type(text).__name__}")
    return quote(text, safe=_SAFE, encoding="utf-8", errors="surrogatepass")


def unescape_segment(segment: str, what: str = "segment") -> str:
    """Inverse of :func:`escape_segment`; rejects non-canonical encodings so
    two different keys can never decode to the same name."""
    try:
        text = unquote(segment, encoding="utf-8", errors="surrogatepass")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {segment!r} is not valid percent-encoded "
                         f"UTF-8") from exc
    if escape_segment(text, what) != segment:
        raise ValueError(f"{what} {segment!r} is not in canonical escaped form")
    return text


def encode_json(obj: Any) -> bytes:
    """Compact, key-sorted JSON so equal records encode to equal bytes (which
    lets ``ValueEquals`` compares work on re-encoded values)."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True,
                      ensure_ascii=False).encode("utf-8")


def decode_json(data: bytes | bytearray | memoryview | str) -> Any:
    """Decode a value written by :func:`encode_json`."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = bytes(data).decode("utf-8")
    return json.loads(data)


class Keyspace:
    """Keys and prefixes for one meshray cluster.

    ``cluster=None`` is the default, unnamed cluster rooted at ``/meshray/v1/``.
    A named cluster is rooted at ``/<cluster>/meshray/v1/``; the two roots are
    disjoint, so a prefix read or delete in one never touches the other.
    """

    __slots__ = ("cluster", "root")

    def __init__(self, cluster: str | None = None):
        if cluster is not None and not (isinstance(cluster, str)
                                        and _CLUSTER_RE.match(cluster)):
            raise ValueError(
                f"cluster name must match {_CLUSTER_RE.pattern} (letters, "
                f"digits, '.', '_', '-'; at most 64 chars); got {cluster!r}")
        self.cluster = cluster
        self.root = ROOT if cluster is None else f"/{cluster}{ROOT}"

    def __repr__(self) -> str:
        return f"Keyspace(cluster={self.cluster!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Keyspace) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

    # -- prefixes -------------------------------------------------------

    def prefix(self, family: str) -> str:
        """Prefix covering every key of one family, e.g. all node records."""
        if family not in FAMILIES:
            raise ValueError(f"unknown key family {family!r}; expected one of "
                             f"{sorted(FAMILIES)}")
        return f"{self.root}{family}/"

    def nodes_prefix(self) -> str:
        return self.prefix("nodes")

    def avail_prefix(self) -> str:
        return self.prefix("avail")

    def avail_range(self, low: str, high: str | None) -> tuple[str, str]:
        """(start, end) of the availability keys whose node id begins at
        hex `low` or after, and before hex `high` (None: to the family's
        last key): one slice of the members (node/avail_slice.py)."""
        return self._id_range("avail", low, high)

    def pgs_range(self, low: str, high: str | None) -> tuple[str, str]:
        """(start, end) of the group records whose id begins at hex `low` or
        after, and before hex `high` (None: to the last): one slice of the
        groups (node/group_follow.py)."""
        return self._id_range("pgs", low, high)

    def _id_range(self, family: str, low: str, high: str | None) -> tuple[str, str]:
        for name, value in (("low", low), ("high", high)):
            if value is not None and not _LOWER_HEX_RE.fullmatch(value):
                raise ValueError(f"{name}={value!r}: expected lowercase hex digits")
        base = self.prefix(family)
        # '/' + 1 is '0': the end of every key under the family's prefix.
        end = f"{base}{high}" if high is not None else f"{base[:-1]}0"
        return f"{base}{low}", end

    def actors_prefix(self) -> str:
        return self.prefix("actors")

    def actor_names_prefix(self, namespace: str | None = None) -> str:
        """All actor-name claims, or those of one namespace."""
        return self._names_prefix("actor_names", namespace)

    def objloc_prefix(self, object_id: Any = None) -> str:
        """All object locations, or every location of one object."""
        base = self.prefix("objloc")
        if object_id is None:
            return base
        return f"{base}{id_hex(object_id, 'object_id')}/"

    def pgs_prefix(self) -> str:
        return self.prefix("pgs")

    def pg_names_prefix(self, namespace: str | None = None) -> str:
        """All placement-group name claims, or those of one namespace."""
        return self._names_prefix("pg_names", namespace)

    def alloc_prefix(self) -> str:
        return self.prefix("alloc")

    def jobs_prefix(self) -> str:
        return self.prefix("jobs")

    def _names_prefix(self, family: str, namespace: str | None) -> str:
        base = self.prefix(family)
        if namespace is None:
            return base
        return f"{base}{escape_segment(namespace, 'namespace')}/"

    # -- keys -----------------------------------------------------------

    def node(self, node_id: Any) -> str:
        return f"{self.prefix('nodes')}{id_hex(node_id, 'node_id')}"

    def avail(self, node_id: Any) -> str:
        return f"{self.prefix('avail')}{id_hex(node_id, 'node_id')}"

    def actor(self, actor_id: Any) -> str:
        return f"{self.prefix('actors')}{id_hex(actor_id, 'actor_id')}"

    def actor_name(self, namespace: str, name: str) -> str:
        return (f"{self.actor_names_prefix(namespace)}"
                f"{escape_segment(name, 'name')}")

    def objloc(self, object_id: Any, node_id: Any) -> str:
        return f"{self.objloc_prefix(object_id)}{id_hex(node_id, 'node_id')}"

    def pg(self, pg_id: Any) -> str:
        return f"{self.prefix('pgs')}{id_hex(pg_id, 'pg_id')}"

    def pg_name(self, namespace: str, name: str) -> str:
        return f"{self.pg_names_prefix(namespace)}{escape_segment(name, 'name')}"

    def alloc(self, node_id: Any) -> str:
        return f"{self.prefix('alloc')}{id_hex(node_id, 'node_id')}"

    def job(self, submission_id: str) -> str:
        """A job's record; the submission id is free-form, so escaped."""
        if not submission_id:
            raise ValueError("submission_id must be a non-empty string")
        return f"{self.prefix('jobs')}{escape_segment(submission_id, 'submission_id')}"

    def job_packages_prefix(self) -> str:
        return self.prefix("job_packages")

    def job_package(self, name: str) -> str:
        """An uploaded package's record; `name` is its URI without the scheme."""
        if not name:
            raise ValueError("package name must be a non-empty string")
        return f"{self.prefix('job_packages')}{escape_segment(name, 'package name')}"

    def job_package_chunks_prefix(self, name: str) -> str:
        return f"{self.prefix('job_package_chunks')}{escape_segment(name, 'package name')}/"

    def job_package_chunk(self, name: str, index: int) -> str:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 10 ** 6:
            raise ValueError(f"chunk index={index!r}: expected a whole number 0..999999")
        return f"{self.job_package_chunks_prefix(name)}{index:06d}"

    # -- parsers --------------------------------------------------------

    def parse(self, key: str | bytes) -> ParsedKey:
        """Split any meshray key of this cluster into family and parts.

        Raises ValueError for keys outside this keyspace, unknown families,
        the wrong number of segments, or malformed ids/names — so a watcher
        over a broad prefix can tell foreign keys from its own.
        """
        if isinstance(key, (bytes, bytearray)):
            key = bytes(key).decode("utf-8", "surrogateescape")
        if not isinstance(key, str):
            raise TypeError(f"key must be str or bytes, got "
                            f"{type(key).__name__}")
        if not key.startswith(self.root):
            raise ValueError(f"key {key!r} is not under {self.root!r}")
        family, sep, rest = key[len(self.root):].partition("/")
        if not sep or family not in FAMILIES:
            raise ValueError(f"key {key!r} has no known family after "
                             f"{self.root!r}; expected one of "
                             f"{sorted(FAMILIES)}")
        parts = rest.split("/")
        if len(parts) != FAMILIES[family]:
            raise ValueError(f"key {key!r}: family {family!r} expects "
                             f"{FAMILIES[family]} segment(s), got {len(parts)}")
        if family in ("actor_names", "pg_names"):
            decoded = (unescape_segment(parts[0], "namespace"),
                       unescape_segment(parts[1], "name"))
        elif family == "jobs":
            decoded = (unescape_segment(parts[0], "submission_id"),)
        elif family == "job_packages":
            decoded = (unescape_segment(parts[0], "package name"),)
        elif family == "job_package_chunks":
            if not _CHUNK_RE.match(parts[1]):
                raise ValueError(f"key {key!r}: chunk {parts[1]!r} is not six digits")
            decoded = (unescape_segment(parts[0], "package name"), parts[1])
        else:
            for part in parts:
                if not _HEX_RE.match(part):
                    raise ValueError(f"key {key!r}: segment {part!r} is not "
                                     f"lowercase hex")
            decoded = tuple(parts)
        return ParsedKey(family, decoded)

    def _parse_family(self, key: str | bytes, family: str) -> tuple[str, ...]:
        parsed = self.parse(key)
        if parsed.family != family:
            raise ValueError(f"key {key!r} is a {parsed.family!r} key, "
                             f"expected {family!r}")
        return parsed.parts

    def parse_node(self, key: str | bytes) -> str:
        """Node key -> node_id hex."""
        return self._parse_family(key, "nodes")[0]

    def parse_avail(self, key: str | bytes) -> str:
        """Availability key -> node_id hex."""
        return self._parse_family(key, "avail")[0]

    def parse_objloc(self, key: str | bytes) -> tuple[str, str]:
        """Object-location key -> (object_id hex, node_id hex)."""
        obj, node = self._parse_family(key, "objloc")
        return obj, node

    def parse_pg(self, key: str | bytes) -> str:
        """Placement-group key -> pg_id hex."""
        return self._parse_family(key, "pgs")[0]

    def parse_alloc(self, key: str | bytes) -> str:
        """Allocation key -> node_id hex."""
        return self._parse_family(key, "alloc")[0]

    def parse_job(self, key: str | bytes) -> str:
        """Job key -> submission id."""
        return self._parse_family(key, "jobs")[0]


DEFAULT = Keyspace()
"""The unnamed cluster's keyspace, for callers that never name a cluster."""
