"""The podman cluster script's decisions (deploy/podman/run_cluster.py), as
pure functions: which tools are missing, the base image's cache tag, pip's
platform tags, the fixed member addresses, the etcd leader, the image's
context hash -- and that the Containerfile builds from the local base only.
"""
from __future__ import annotations

import importlib.util
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location(
        "run_cluster", os.path.join(REPO, "deploy", "podman", "run_cluster.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_missing_tools_names_each_absent_command(script):
    present = {"podman"}
    missing = script.missing_tools(which=lambda tool, path: tool if tool in present else None)
    assert missing == ["runc", "debootstrap", "catatonit"]
    assert script.missing_tools(which=lambda tool, path: "/usr/bin/" + tool) == []


def test_base_tag_changes_with_the_package_list_only(script):
    tag = script.base_tag(("python3", "etcd-server"))
    assert tag.startswith("localhost/meshray-base:bookworm-")
    assert script.base_tag(("etcd-server", "python3")) == tag          # order does not matter
    assert script.base_tag(("python3", "etcd-server", "curl")) != tag
    assert script.base_tag(("python3", "etcd-server"), suite="trixie").split(":")[1] \
        .startswith("trixie-")


def test_manylinux_platforms_name_every_older_glibc(script):
    tags = script.manylinux_platforms("2.36", "x86_64")
    assert tags[0] == "manylinux_2_36_x86_64"
    assert "manylinux_2_17_x86_64" in tags and "manylinux2014_x86_64" in tags
    assert "manylinux_2_37_x86_64" not in tags and "manylinux_2_16_x86_64" not in tags
    with pytest.raises(script.CannotRun, match="glibc 2.12"):
        script.manylinux_platforms("2.12", "x86_64")


def test_member_addresses_are_fixed_offsets_in_the_subnet(script):
    assert script.member_addresses("10.89.3.0/24", 3, 11) == ["10.89.3.11", "10.89.3.12",
                                                              "10.89.3.13"]
    with pytest.raises(script.CheckFailed, match="10.1.2.0/28"):
        script.member_addresses("10.1.2.0/28", 3, 11)


def test_etcd_leader_is_the_member_whose_id_is_the_leader(script):
    statuses = [
        {"Endpoint": "http://10.0.0.11:2379", "Status": {"header": {"member_id": 1}, "leader": 2}},
        {"Endpoint": "http://10.0.0.12:2379", "Status": {"header": {"member_id": 2}, "leader": 2}},
        {"Endpoint": "http://10.0.0.13:2379", "Status": {"header": {"member_id": 3}, "leader": 2}},
    ]
    assert script.etcd_leader(statuses) == "http://10.0.0.12:2379"
    assert script.etcd_leader(statuses[:1] + statuses[2:]) is None      # leader not asked
    assert script.etcd_leader([{"Endpoint": "x", "Status": {"leader": 0}}]) is None


def test_context_hash_follows_file_contents(script, tmp_path):
    source = tmp_path / "pkg"
    source.mkdir()
    (source / "a.py").write_text("one")
    (source / "__pycache__").mkdir()
    (source / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"junk")
    first = script.context_hash([str(source)], "base:1")
    (source / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"other junk")
    assert script.context_hash([str(source)], "base:1") == first        # caches ignored
    assert script.context_hash([str(source)], "base:2") != first        # another base
    (source / "a.py").write_text("two")
    assert script.context_hash([str(source)], "base:1") != first


def test_containerfile_builds_from_the_local_base_without_network(script):
    with open(script.CONTAINERFILE) as handle:
        text = handle.read()
    assert re.search(r"^ARG BASE=localhost/", text, re.M)
    assert re.search(r"^FROM \$\{BASE\}$", text, re.M)
    assert "--no-index --find-links /tmp/wheels meshray" in text
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert "default_ulimits = []" in script.CONTAINERS_CONF
    assert 'runtime = "runc"' in script.CONTAINERS_CONF
