"""Driver-side packaging: gitignore rules, deterministic zips, size cap, upload plans."""
from __future__ import annotations

import io
import os
import zipfile

import pytest

from meshray.runtime_env import (
    Package, PackageError, package_directory, package_file, package_wheel_or_module, parse_uri,
    unpack_package, upload_plan, uris_in,
)
from meshray.runtime_env.gitignore import is_ignored, parse_patterns


def names(pkg: Package) -> list[str]:
    return zipfile.ZipFile(io.BytesIO(pkg.data)).namelist()


def write(root, rel, text="x"):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---- gitignore semantics -------------------------------------------------------------

@pytest.mark.parametrize("pattern,path,is_dir,ignored", [
    ("*.log", "a.log", False, True),
    ("*.log", "deep/dir/a.log", False, True),
    ("*.log", "a.logx", False, False),
    ("build/", "build", True, True),
    ("build/", "build", False, False),            # dir-only pattern, file of that name
    ("build/", "src/build", True, True),
    ("/build", "build", True, True),
    ("/build", "src/build", True, False),          # anchored to the root
    ("doc/frotz", "doc/frotz", True, True),
    ("doc/frotz", "a/doc/frotz", True, False),     # a middle slash anchors too
    ("**/foo", "foo", False, True),
    ("**/foo", "x/y/foo", False, True),
    ("**/foo/bar", "x/foo/bar", False, True),
    ("abc/**", "abc/x/y", False, True),
    ("abc/**", "abc", True, False),
    ("a/**/b", "a/b", False, True),
    ("a/**/b", "a/x/y/b", False, True),
    ("a/**/b", "ab", False, False),
    ("?.txt", "a.txt", False, True),
    ("?.txt", "ab.txt", False, False),
    ("[ab].txt", "b.txt", False, True),
    ("[!ab].txt", "b.txt", False, False),
    ("[!ab].txt", "c.txt", False, True),
    ("\\#notes", "#notes", False, True),
    ("*", "anything/at/all", False, True),
    ("foo*bar", "foo/bar", False, False),          # '*' does not cross '/'
])
def test_gitignore_patterns(pattern, path, is_dir, ignored):
    assert is_ignored(path, is_dir, parse_patterns([pattern])) is ignored


def test_gitignore_negation_comments_and_order():
    rules = parse_patterns(["# comment", "", "*.log", "!keep.log", "trailing   "])
    assert is_ignored("a.log", False, rules)
    assert not is_ignored("keep.log", False, rules)
    assert is_ignored("trailing", False, rules)
    assert not is_ignored("# comment", False, rules)


def test_nested_gitignore_rules_are_relative_to_their_dir():
    rules = parse_patterns(["*.tmp"]) + parse_patterns(["/local.txt", "!important.tmp"], "sub")
    assert is_ignored("sub/local.txt", False, rules)
    assert not is_ignored("local.txt", False, rules)
    assert not is_ignored("sub/important.tmp", False, rules)   # deeper file overrides
    assert is_ignored("important.tmp", False, rules)


# ---- directory packages --------------------------------------------------------------

def test_same_content_same_uri_and_bytes(tmp_path):
    for d in ("one", "two"):
        write(tmp_path, f"{d}/a.py", "print(1)")
        write(tmp_path, f"{d}/sub/b.txt", "b")
    (tmp_path / "one" / "a.py").touch()
    os.utime(tmp_path / "two" / "a.py", (1, 1))              # different mtimes
    p1, p2 = package_directory(tmp_path / "one"), package_directory(tmp_path / "two")
    assert p1.uri == p2.uri and p1.data == p2.data
    assert p1.uri.startswith("meshray-pkg://") and p1.uri.endswith(".zip")
    assert names(p1) == ["a.py", "sub/b.txt"]
    write(tmp_path, "two/sub/b.txt", "changed")
    assert package_directory(tmp_path / "two").uri != p1.uri


def test_executable_bit_changes_the_hash_and_survives(tmp_path):
    script = write(tmp_path, "d/run.sh", "#!/bin/sh\n")
    plain = package_directory(tmp_path / "d")
    script.chmod(0o755)
    execp = package_directory(tmp_path / "d")
    assert plain.uri != execp.uri
    out = unpack_package(execp.uri, execp.data, str(tmp_path / "out"))
    assert os.access(os.path.join(out, "run.sh"), os.X_OK)


def test_gitignore_and_excludes_leave_files_out(tmp_path):
    root = tmp_path / "proj"
    write(root, ".gitignore", "*.log\nbuild/\n")
    write(root, "main.py")
    write(root, "app.log")
    write(root, "build/out.bin")
    write(root, "data/big.csv")
    write(root, "data/small.csv")
    write(root, "nested/.gitignore", "secret.txt\n")
    write(root, "nested/secret.txt")
    write(root, "nested/ok.txt")
    write(root, ".git/HEAD")
    (root / "empty").mkdir()
    pkg = package_directory(root, excludes=["/data/big.csv"])
    assert names(pkg) == [".gitignore", "data/small.csv", "empty/", "main.py",
                          "nested/.gitignore", "nested/ok.txt"]


def test_gitignore_can_be_switched_off(tmp_path, monkeypatch):
    write(tmp_path, "d/.gitignore", "*.log\n")
    write(tmp_path, "d/a.log")
    monkeypatch.setenv("MESHRAY_RUNTIME_ENV_IGNORE_GITIGNORE", "1")
    assert "a.log" in names(package_directory(tmp_path / "d"))


def test_size_cap_names_directory_size_and_cap(tmp_path, monkeypatch):
    write(tmp_path, "d/big.bin", "x" * 5000)
    write(tmp_path, "d/small.txt", "y")
    with pytest.raises(PackageError) as info:
        package_directory(tmp_path / "d", max_bytes=1000)
    msg = str(info.value)
    assert str(tmp_path / "d") in msg and "5001 bytes" in msg and "1000 bytes" in msg
    assert "big.bin" in msg and "excludes" in msg and "MESHRAY_RUNTIME_ENV_MAX_SIZE" in msg
    assert isinstance(info.value, ValueError)
    monkeypatch.setenv("MESHRAY_RUNTIME_ENV_MAX_SIZE", "1KB")
    with pytest.raises(PackageError, match="over the 1000 bytes limit"):
        package_directory(tmp_path / "d")
    assert package_directory(tmp_path / "d", excludes=["*.bin"])   # excluded bytes don't count


def test_symlink_loops_and_dangling_links_are_skipped(tmp_path):
    write(tmp_path, "d/a.txt")
    os.symlink(tmp_path / "d", tmp_path / "d" / "loop")
    os.symlink(tmp_path / "nowhere", tmp_path / "d" / "dangling")
    assert names(package_directory(tmp_path / "d")) == ["a.txt"]


def test_roundtrip_and_tamper_detection(tmp_path):
    write(tmp_path, "d/x/y.py", "Y = 1")
    pkg = package_directory(tmp_path / "d")
    out = unpack_package(pkg.uri, pkg.data, str(tmp_path / "u"))
    assert open(os.path.join(out, "x", "y.py")).read() == "Y = 1"
    other = package_directory(tmp_path / "d" / "x")
    with pytest.raises(PackageError, match="does not match its hash"):
        unpack_package(pkg.uri, other.data, str(tmp_path / "u2"))


def test_unpack_refuses_escaping_members(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../evil.py", "x")
    with pytest.raises(PackageError, match="unsafe path"):
        unpack_package("meshray-pkg://" + "0" * 64 + ".zip", buf.getvalue(), str(tmp_path / "u"))
    assert not (tmp_path / "evil.py").exists()


# ---- modules, wheels, files ----------------------------------------------------------------

def test_py_module_directory_keeps_its_import_name(tmp_path):
    write(tmp_path, "mypkg/__init__.py", "X = 1")
    assert names(package_wheel_or_module(tmp_path / "mypkg")) == ["mypkg/__init__.py"]
    single = write(tmp_path, "solo.py", "Z = 3")
    assert names(package_wheel_or_module(single)) == ["solo.py"]


def test_wheel_is_shipped_verbatim(tmp_path):
    whl = tmp_path / "w-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("w/__init__.py", "")
    pkg = package_wheel_or_module(whl)
    assert pkg.data == whl.read_bytes() and pkg.uri.endswith(".whl")
    assert parse_uri(pkg.uri) == (pkg.sha256, "wheel", None)
    bad = tmp_path / "bad-1.0-py3-none-any.whl"
    bad.write_bytes(b"not a zip")
    with pytest.raises(PackageError, match="not a valid wheel"):
        package_wheel_or_module(bad)


def test_file_package_keeps_its_name(tmp_path):
    f = tmp_path / "pkg-1.0.tar.gz"
    f.write_bytes(b"abc")
    pkg = package_file(f)
    sha, kind, name = parse_uri(pkg.uri)
    assert kind == "file" and name == "pkg-1.0.tar.gz"
    path = unpack_package(pkg.uri, pkg.data, str(tmp_path / "u"))
    assert path.endswith("/pkg-1.0.tar.gz") and open(path, "rb").read() == b"abc"


# ---- upload plans -------------------------------------------------------------------------

def test_upload_plan_replaces_local_paths(tmp_path):
    write(tmp_path, "wd/main.py")
    write(tmp_path, "wd/skip.me")
    write(tmp_path, "mods/m/__init__.py")
    whl = tmp_path / "dep-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("dep/__init__.py", "")
    env, pkgs = upload_plan({
        "working_dir": str(tmp_path / "wd"), "py_modules": [str(tmp_path / "mods/m")],
        "pip": ["requests", str(whl)], "excludes": ["*.me"], "env_vars": {"A": "1"},
        "config": {"setup_timeout_seconds": 10}})
    assert "excludes" not in env
    assert env["env_vars"] == {"A": "1"} and env["config"]["setup_timeout_seconds"] == 10
    assert env["pip"]["packages"][0] == "requests"
    assert sorted(uris_in(env)) == sorted(p.uri for p in pkgs) and len(pkgs) == 3
    wd_pkg = next(p for p in pkgs if p.uri == env["working_dir"])
    assert names(wd_pkg) == ["main.py"]
    assert env["pip"]["packages"][1].endswith("/dep-1.0-py3-none-any.whl")
    again, pkgs2 = upload_plan(env)            # an uploaded env needs nothing more
    assert again == env and pkgs2 == []


def test_upload_plan_dedupes_identical_content(tmp_path):
    write(tmp_path, "a/m/__init__.py", "same")
    write(tmp_path, "b/m/__init__.py", "same")
    env, pkgs = upload_plan({"py_modules": [str(tmp_path / "a/m"), str(tmp_path / "b/m")]})
    assert env["py_modules"][0] == env["py_modules"][1] and len(pkgs) == 1


def test_upload_plan_of_nothing():
    assert upload_plan(None) == (None, [])
    assert upload_plan({"env_vars": {"A": "1"}}) == ({"env_vars": {"A": "1"}}, [])
