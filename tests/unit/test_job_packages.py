"""Uploaded job packages: what a node accepts (verify_package), which stored
packages are collected, and their etcd keys."""
from __future__ import annotations

import io
import stat
import zipfile

import pytest

from meshray.coordination.keyspace import Keyspace
from meshray.node import job_packages as packages
from meshray.runtime_env import PackageError, package_directory
from meshray.runtime_env.packaging import verify_package

ZEROS = "meshray-pkg://" + "0" * 64 + ".zip"


def _zip(*members) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, data in members:
            zf.writestr(info, data)
    return buf.getvalue()


def test_a_real_package_passes_and_a_changed_one_does_not(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.py").write_text("A = 1\n")
    package = package_directory(tmp_path / "d")
    verify_package(package.uri, package.data)
    other = package_directory(tmp_path / "d", excludes=["a.py"])
    with pytest.raises(PackageError, match="does not match its hash"):
        verify_package(package.uri, other.data)


def test_unsafe_members_are_refused_before_the_hash():
    link = zipfile.ZipInfo("link")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    for data, why in ((_zip(("../up.py", "x")), "unsafe path"),
                      (_zip(("/abs.py", "x")), "unsafe path"),
                      (_zip((link, "/etc/passwd")), "links"),
                      (b"not a zip", "not a valid zip")):
        with pytest.raises(PackageError, match=why):
            verify_package(ZEROS, data)


def test_a_zip_that_unpacks_past_the_cap_is_refused():
    bomb = _zip(("zeros.bin", b"\0" * (2 << 20)))
    assert len(bomb) < 64 << 10
    with pytest.raises(PackageError, match="unpacks to over"):
        verify_package(ZEROS, bomb, max_bytes=1 << 20)


def test_packages_no_job_names_are_collected_once_old():
    named = "a" * 64 + ".zip"
    stored = {named: {"created_ms": 0}, "b" * 64 + ".zip": {"created_ms": 0},
              "c" * 64 + ".zip": {"created_ms": 990_000}, "d" * 64 + ".zip": "junk"}
    records = [{"runtime_env": {"working_dir": "meshray-pkg://" + named}}, "junk"]
    assert sorted(packages.unreferenced(stored, records, 1_000_000, 600)) == [
        "b" * 64 + ".zip", "d" * 64 + ".zip"]


def test_upload_routes_name_only_meshray_package_uris():
    assert packages.uri_of("meshray-pkg", "e" * 64 + ".zip") == "meshray-pkg://" + "e" * 64 + ".zip"
    for protocol, name in (("gcs", "_ray_pkg_x.zip"), ("meshray-pkg", "../x"),
                           ("meshray-pkg", "e" * 64 + ".tar")):
        with pytest.raises(PackageError):
            packages.uri_of(protocol, name)


def test_package_keys_round_trip():
    keys = Keyspace()
    name = "f" * 64 + "/my lib-1.0.tar.gz"
    assert keys.parse(keys.job_package(name)).parts == (name,)
    assert keys.parse(keys.job_package_chunk(name, 3)).parts == (name, "000003")
    with pytest.raises(ValueError, match="chunk index"):
        keys.job_package_chunk(name, -1)
