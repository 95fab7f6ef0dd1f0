"""The rules for trusting local files and node records, without other users.

The ownership rule and the record shape are pure functions, so cases that are
awkward to build for real (a file owned by another uid, a malformed record)
are checked directly; files of our own exercise the open-and-fstat path
(symlinks, FIFOs, modes). tests/integration/test_local_files.py plants the
hostile files as a real second user.
"""
from __future__ import annotations

import os
import stat

import pytest

from meshray.node.registry import record_problem
from meshray.common.private_files import (
    UnsafePathError,
    open_private_dir,
    ownership_problem,
    read_file_in_private_dir,
    read_private_file,
)

ME = os.geteuid()


def _stat(mode: int, uid: int = ME) -> os.stat_result:
    return os.stat_result((mode, 1, 1, 1, uid, 0, 0, 0, 0, 0))


# -------------------------------------------------------------- ownership rule
@pytest.mark.parametrize("mode, uid, directory, expected", [
    (stat.S_IFDIR | 0o700, ME, True, None),
    (stat.S_IFDIR | 0o755, ME, True, None),
    (stat.S_IFREG | 0o600, ME, False, None),
    (stat.S_IFREG | 0o644, ME, False, None),
    (stat.S_IFDIR | 0o700, ME + 1, True, f"owned by uid {ME + 1}"),
    (stat.S_IFDIR | 0o777, ME, True, "writable by group/others"),
    (stat.S_IFDIR | 0o770, ME, True, "writable by group/others"),
    (stat.S_IFREG | 0o666, ME, False, "writable by group/others"),
    (stat.S_IFREG | 0o620, ME, False, "writable by group/others"),
    (stat.S_IFREG | 0o600, ME, True, "not a directory"),
    (stat.S_IFIFO | 0o600, ME, False, "not a regular file"),
    (stat.S_IFDIR | 0o700, ME, False, "not a regular file"),
])
def test_ownership_rule(mode, uid, directory, expected):
    problem = ownership_problem(_stat(mode, uid), uid=ME, directory=directory)
    if expected is None:
        assert problem is None
    else:
        assert expected in problem
        assert f"mode {stat.S_IMODE(mode):04o}" in problem


def test_refusal_names_path_owner_mode_and_expectation(tmp_path):
    target = tmp_path / "token"
    target.write_text("x")
    target.chmod(0o666)
    with pytest.raises(UnsafePathError) as info:
        read_private_file(str(target), what="token file")
    message = str(info.value)
    assert repr(str(target)) in message
    assert f"owned by uid {ME}" in message and "mode 0666" in message
    assert "expected a regular file (not a symlink) owned by" in message
    assert isinstance(info.value, PermissionError)


def test_symlinks_are_refused_even_to_private_targets(tmp_path):
    real_dir = tmp_path / "real"
    real_dir.mkdir(mode=0o700)
    (real_dir / "token").write_text("secret")
    (real_dir / "token").chmod(0o600)
    (tmp_path / "dir-link").symlink_to(real_dir)
    (real_dir / "file-link").symlink_to(real_dir / "token")
    with pytest.raises(UnsafePathError, match="symbolic link"):
        open_private_dir(str(tmp_path / "dir-link"))
    with pytest.raises(UnsafePathError, match="symbolic link"):
        read_file_in_private_dir(str(real_dir), "file-link", what="token file")
    assert read_file_in_private_dir(str(real_dir), "token", what="token file") == b"secret"


def test_fifo_in_place_of_a_file_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "token"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(UnsafePathError, match="not a regular file"):
        read_private_file(str(fifo))


def test_create_makes_a_private_dir_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        fd = open_private_dir(str(tmp_path / "made"), create=True)
    finally:
        os.umask(old)
    os.close(fd)
    assert stat.S_IMODE(os.stat(tmp_path / "made").st_mode) == 0o700


# --------------------------------------------------------------- record shape
def _record(**changes):
    record = {"node_id": "ab" * 16, "pid": 4242, "create_time": 1.5e9,
              "session_dir": "/tmp/meshray-x", "local_address": "unix:/tmp/meshray-x/node.sock",
              "address": "127.0.0.1:7000", "etcd": "127.0.0.1:2379"}
    record.update(changes)
    return record


@pytest.mark.parametrize("changes, expected", [
    ({}, None),
    ({"node_id": "cd" * 16}, "does not match the file name"),
    ({"pid": 0}, "pid 0"),
    ({"pid": True}, "pid True"),
    ({"pid": "4242"}, "pid '4242'"),
    ({"create_time": None}, "cannot be verified"),
    ({"session_dir": "relative"}, "not an absolute path"),
    ({"local_address": "unix:/tmp/elsewhere/node.sock"}, "inside its session dir"),
    ({"local_address": "unix:/tmp/meshray-x/../evil/node.sock"}, "inside its session dir"),
    ({"local_address": "10.0.0.1:7000"}, "inside its session dir"),
    ({"address": 7}, "address 7"),
])
def test_record_shape(changes, expected):
    problem = record_problem(_record(**changes), "ab" * 16)
    assert problem is None if expected is None else expected in problem


def test_record_must_be_an_object():
    assert "not a JSON object" in record_problem(["ab"], "ab" * 16)
