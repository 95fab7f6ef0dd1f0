"""Log files on a node: settings, names, rotation, safe reads, request checks."""
from __future__ import annotations

import asyncio
import os

import pytest

from meshray.node import log_files
from meshray.node.log_service import check_get_request, check_list_request


def test_rotation_settings_read_meshray_then_ray_names_with_ray_defaults():
    assert log_files.rotation_settings({}) == (512 << 20, 5)
    assert log_files.rotation_settings({"RAY_ROTATION_MAX_BYTES": "1000",
                                        "RAY_ROTATION_BACKUP_COUNT": "2"}) == (1000, 2)
    assert log_files.rotation_settings({"RAY_ROTATION_MAX_BYTES": "1000",
                                        "MESHRAY_LOG_ROTATION_MAX_BYTES": "7"})[0] == 7
    with pytest.raises(ValueError, match="RAY_ROTATION_BACKUP_COUNT='-1'"):
        log_files.rotation_settings({"RAY_ROTATION_BACKUP_COUNT": "-1"})
    with pytest.raises(ValueError, match="MESHRAY_LOG_ROTATION_MAX_BYTES='lots'"):
        log_files.rotation_settings({"MESHRAY_LOG_ROTATION_MAX_BYTES": "lots"})


@pytest.mark.parametrize("name", ["../node.log", "..", "logs/x.out", "/etc/passwd", "",
                                  ".hidden", "a\x00b", "x..y", 7, None, "a b"])
def test_check_filename_refuses_anything_but_a_plain_name(name):
    with pytest.raises(ValueError, match="filename="):
        log_files.check_filename(name)


def test_check_filename_accepts_log_names():
    for name in ("node.log", "worker-ab-ffffffff-12.out", "worker-ab-ffffffff-12.err.3",
                 "runtime_env_setup-0011.log"):
        assert log_files.check_filename(name) == name


def test_groups_keep_backups_with_their_file():
    assert log_files.log_group("worker-a-ffffffff-1.out.2") == "worker_out"
    assert log_files.log_group("worker-a-ffffffff-1.err") == "worker_err"
    assert log_files.log_group("runtime_env_setup-01.log") == "runtime_env"
    assert log_files.log_group("node.log") == "node"


def _dir_fd(path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


def test_rotation_keeps_at_most_backup_count_files_of_at_most_max_bytes(tmp_path):
    fd = _dir_fd(tmp_path)
    try:
        handle = log_files.RotatingFile(fd, "w.out", max_bytes=100, backup_count=2)
        for index in range(60):
            handle.write(f"line {index:04d}\n".encode())     # 10 bytes a line
        handle.close()
    finally:
        os.close(fd)
    assert sorted(os.listdir(tmp_path)) == ["w.out", "w.out.1", "w.out.2"]
    assert all(os.path.getsize(tmp_path / n) <= 100 for n in os.listdir(tmp_path))
    # The newest lines are in w.out, lines are never split across files.
    assert (tmp_path / "w.out").read_text().splitlines()[-1] == "line 0059"
    assert (tmp_path / "w.out.1").read_text().endswith("\n")
    assert oct(os.stat(tmp_path / "w.out").st_mode & 0o777) == "0o600"


def test_the_current_name_is_never_missing_while_a_file_rotates(tmp_path):
    """A reader opening the file by name mid-rotation finds a file (get_log by pid does)."""
    import threading
    fd = _dir_fd(tmp_path)
    stop, misses, opened = threading.Event(), [], [0]

    def read():
        while not stop.is_set():
            try:
                os.close(os.open(tmp_path / "w.out", os.O_RDONLY))
                opened[0] += 1
            except FileNotFoundError as error:
                misses.append(error)

    reader = threading.Thread(target=read)
    try:
        handle = log_files.RotatingFile(fd, "w.out", max_bytes=20, backup_count=1)
        reader.start()
        for index in range(5000):
            handle.write(f"line {index:04d}\n".encode())    # a rotation every 2 lines
        handle.close()
    finally:
        stop.set()
        reader.join(timeout=10)
        os.close(fd)
    assert opened[0] > 0 and misses == []
    assert sorted(os.listdir(tmp_path)) == ["w.out", "w.out.1"]
    assert (tmp_path / "w.out").read_text() == "line 4998\nline 4999\n"
    assert (tmp_path / "w.out.1").read_text() == "line 4996\nline 4997\n"


def test_no_rotation_when_backup_count_is_zero(tmp_path):
    fd = _dir_fd(tmp_path)
    try:
        handle = log_files.RotatingFile(fd, "w.out", max_bytes=10, backup_count=0)
        handle.write(b"x" * 100)
        handle.close()
    finally:
        os.close(fd)
    assert os.listdir(tmp_path) == ["w.out"]


def test_read_log_tail_offset_and_rotation(tmp_path):
    (tmp_path / "f.out").write_bytes(b"a\nb\nc\n")
    fd = _dir_fd(tmp_path)
    try:
        def read(**kw):
            return log_files.read_log(fd, "f.out", **{"offset": None, "tail": -1,
                                                       "file_id": None, **kw})
        assert read()["data"] == b"a\nb\nc\n"
        assert read(tail=2)["data"] == b"b\nc\n"
        assert read(tail=0)["data"] == b""
        assert read(tail=10)["data"] == b"a\nb\nc\n"
        first = read(tail=1)
        with open(tmp_path / "f.out", "ab") as handle:
            handle.write(b"d\n")
        more = read(offset=first["next_offset"], file_id=first["file_id"])
        assert more["data"] == b"d\n" and not more["rotated"]
        os.rename(tmp_path / "f.out", tmp_path / "f.out.1")
        (tmp_path / "f.out").write_bytes(b"new\n")
        again = read(offset=more["next_offset"], file_id=more["file_id"])
        assert again["rotated"] and again["data"] == b"new\n"
    finally:
        os.close(fd)


def test_read_log_does_not_follow_symlinks(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("do not read")
    logs = tmp_path / "logs"
    logs.mkdir()
    os.symlink(secret, logs / "link.out")
    fd = _dir_fd(logs)
    try:
        with pytest.raises(OSError):
            log_files.read_log(fd, "link.out", offset=None, tail=-1, file_id=None)
        assert log_files.list_files([(fd, None)], None) == []
    finally:
        os.close(fd)


def test_writer_buffers_then_writes_and_keeps_files(tmp_path):
    async def scenario():
        writer = log_files.LogWriter(str(tmp_path / "logs"), max_bytes=0, backup_count=0)
        stopping = asyncio.Event()
        runner = asyncio.get_running_loop().create_task(writer.run(stopping))
        writer.append("w.out", b"")
        writer.append("w.out", b"hello\n")
        writer.finish("w.out")
        for _ in range(100):
            await asyncio.sleep(0.02)
            if (tmp_path / "logs" / "w.out").exists() and \
                    (tmp_path / "logs" / "w.out").read_bytes():
                break
        writer.append("w.err", b"last words\n")      # written by aclose
        stopping.set()
        await runner
        await writer.aclose()

    asyncio.run(scenario())
    assert (tmp_path / "logs" / "w.out").read_bytes() == b"hello\n"
    assert (tmp_path / "logs" / "w.err").read_bytes() == b"last words\n"
    assert oct(os.stat(tmp_path / "logs").st_mode & 0o777) == "0o700"


def test_writer_drops_and_says_so_when_the_disk_falls_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(log_files, "MAX_PENDING_BYTES", 10)

    async def scenario():
        writer = log_files.LogWriter(str(tmp_path), max_bytes=0, backup_count=0)
        writer.append("w.out", b"12345\n")
        writer.append("w.out", b"this one does not fit\n")
        await writer.aclose()
        return writer.dropped_bytes

    assert asyncio.run(scenario()) == 22
    text = (tmp_path / "w.out").read_text()
    assert text.startswith("12345\n") and "22 bytes of output dropped" in text


def test_get_request_checks():
    with pytest.raises(ValueError, match="exactly one of"):
        check_get_request({})
    with pytest.raises(ValueError, match="exactly one of"):
        check_get_request({"pid": 3, "task_id": "ab"})
    with pytest.raises(ValueError, match="filename='../x'"):
        check_get_request({"filename": "../x"})
    with pytest.raises(ValueError, match="suffix='log'"):
        check_get_request({"pid": 3, "suffix": "log"})
    with pytest.raises(ValueError, match="tail=-2"):
        check_get_request({"pid": 3, "tail": -2})
    with pytest.raises(ValueError, match="node_id='zz'"):
        check_get_request({"pid": 3, "node_id": "zz"})
    with pytest.raises(ValueError, match="pid=True"):
        check_get_request({"pid": True})
    assert check_get_request({"pid": 3, "limit": 1 << 40}).limit == log_files.MAX_READ_BYTES
    with pytest.raises(ValueError, match="glob="):
        check_list_request({"glob": "../*"})
