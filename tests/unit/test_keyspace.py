"""Key layout: every key round-trips through its parser, foreign keys are
rejected, and names can never reach into a neighbouring key."""

import pytest

from meshray.coordination.keyspace import (
    DEFAULT,
    FAMILIES,
    Keyspace,
    ParsedKey,
    decode_json,
    encode_json,
    escape_segment,
    id_hex,
    unescape_segment,
)

NODE = "ab" * 14
OBJ = "0f" * 20
ACTOR = "c0ffee" * 3


class _Id:
    def __init__(self, b):
        self._b = b

    def hex(self):
        return self._b.hex()


def test_default_and_named_roots_are_disjoint():
    named = Keyspace("prod")
    assert DEFAULT.root == "/meshray/v1/"
    assert named.root == "/prod/meshray/v1/"
    assert not named.node(NODE).startswith(DEFAULT.root)
    assert not DEFAULT.node(NODE).startswith(named.root)
    # A cluster named like the default root's first segment stays disjoint.
    assert not Keyspace("meshray").node(NODE).startswith(DEFAULT.root)


@pytest.mark.parametrize("bad", ["", "a/b", "-x", "x" * 65, "sp ace", 3])
def test_bad_cluster_names_rejected(bad):
    with pytest.raises(ValueError, match="cluster name"):
        Keyspace(bad)


@pytest.mark.parametrize("ks", [DEFAULT, Keyspace("c-1")])
def test_single_id_families_round_trip(ks):
    cases = [
        (ks.node, ks.parse_node, "nodes"),
        (ks.avail, ks.parse_avail, "avail"),
        (ks.actor, None, "actors"),     # read back only through parse()
        (ks.pg, ks.parse_pg, "pgs"),
        (ks.alloc, ks.parse_alloc, "alloc"),
    ]
    for make, parse, family in cases:
        key = make(ACTOR)
        assert key == f"{ks.root}{family}/{ACTOR}"
        assert key.startswith(ks.prefix(family))
        if parse is not None:
            assert parse(key) == ACTOR
            assert parse(key.encode()) == ACTOR
        assert ks.parse(key) == ParsedKey(family, (ACTOR,))


def test_objloc_round_trip_and_per_object_prefix():
    ks = DEFAULT
    key = ks.objloc(OBJ, NODE)
    assert key == f"/meshray/v1/objloc/{OBJ}/{NODE}"
    assert ks.parse_objloc(key) == (OBJ, NODE)
    assert key.startswith(ks.objloc_prefix(OBJ))
    assert key.startswith(ks.objloc_prefix())
    other = "0f" * 21  # shares OBJ as a string prefix
    assert not ks.objloc(other, NODE).startswith(ks.objloc_prefix(OBJ))


def test_ids_accept_bytes_upper_hex_and_id_objects():
    raw = bytes.fromhex(NODE)
    assert DEFAULT.node(raw) == DEFAULT.node(NODE)
    assert DEFAULT.node(NODE.upper()) == DEFAULT.node(NODE)
    assert DEFAULT.node(_Id(raw)) == DEFAULT.node(NODE)
    assert id_hex(bytearray(raw)) == NODE


@pytest.mark.parametrize("bad", ["", "abc", "zz", "ab/cd", "ab cd"])
def test_malformed_ids_rejected(bad):
    with pytest.raises(ValueError, match="node_id"):
        DEFAULT.node(bad)


def test_id_of_wrong_type_rejected():
    with pytest.raises(TypeError, match="node_id"):
        DEFAULT.node(12)


NAMES = ["", "plain", "a/b", "../../nodes/x", "with space", "100%", "%2F",
         "ünïcødé", "emoji-🚀", "tab\tnew\nline", "a.b_c-d~e", "\x00",
         "lone\ud800surrogate"]


@pytest.mark.parametrize("namespace", NAMES)
@pytest.mark.parametrize("name", NAMES)
def test_names_round_trip_and_stay_in_one_segment(namespace, name):
    ks = Keyspace("x")
    for make, family in ((ks.actor_name, "actor_names"), (ks.pg_name, "pg_names")):
        key = make(namespace, name)
        rest = key[len(ks.prefix(family)):]
        assert rest.count("/") == 1
        assert key.isascii()
        assert ks.parse(key) == ParsedKey(family, (namespace, name))
        assert key.startswith(ks._names_prefix(family, namespace))


def test_namespace_prefix_does_not_cover_longer_namespace():
    ks = DEFAULT
    assert not ks.actor_name("ab", "x").startswith(ks.actor_names_prefix("a"))
    assert ks.actor_name("a", "x").startswith(ks.actor_names_prefix("a"))


def test_escape_is_canonical():
    assert unescape_segment(escape_segment("a b")) == "a b"
    for non_canonical in ("a%20b%2f", "%c3%a9", "a b", "%zz", "a%2"):
        with pytest.raises(ValueError):
            unescape_segment(non_canonical)


@pytest.mark.parametrize("key", [
    "/other/app/key",
    "/meshray/v1/",
    "/meshray/v1/nodes",
    "/meshray/v1/unknown/ab",
    f"/meshray/v1/nodes/{NODE}/extra",
    "/meshray/v1/nodes/NOTHEX",
    f"/meshray/v1/nodes/{NODE.upper()}",
    f"/meshray/v1/objloc/{OBJ}",
    "/meshray/v1/actor_names/only-namespace",
    "/meshray/v1/actor_names/ns/bad%zz",
    f"/prod/meshray/v1/nodes/{NODE}",  # another cluster's key
])
def test_foreign_keys_rejected(key):
    with pytest.raises(ValueError):
        DEFAULT.parse(key)


def test_family_specific_parser_rejects_other_family():
    with pytest.raises(ValueError, match="expected 'pgs'"):
        DEFAULT.parse_pg(DEFAULT.node(NODE))


def test_prefix_of_unknown_family():
    with pytest.raises(ValueError, match="unknown key family"):
        DEFAULT.prefix("bogus")


def test_every_family_has_a_prefix_under_root():
    for family in FAMILIES:
        assert DEFAULT.prefix(family) == f"/meshray/v1/{family}/"


def test_json_helpers():
    obj = {"b": 1, "a": [1.5, "é", None], "c": {"z": True}}
    data = encode_json(obj)
    assert isinstance(data, bytes)
    assert data == encode_json(dict(reversed(list(obj.items()))))
    assert decode_json(data) == obj
    assert decode_json(memoryview(data)) == obj
    assert b" " not in data


def test_keyspace_equality_and_hash():
    assert Keyspace("a") == Keyspace("a")
    assert Keyspace("a") != Keyspace("b")
    assert len({Keyspace(), Keyspace(), Keyspace("a")}) == 2
