"""Turning a driver's local paths into content-addressed packages, and back.

The driver zips `working_dir` and directory `py_modules`, reads wheels and
local pip artifacts, and names each by the hash of its content. The env that
travels with tasks then holds only `meshray-pkg://` URIs (small, and safe for
etcd), while the bytes travel once through the object store; a node that has a
URI unpacked already never asks for the bytes again, and two drivers shipping
the same tree share one copy.

URI forms:

* ``meshray-pkg://<sha256>.zip`` -- a directory tree; the hash covers the
  manifest (paths, modes, file digests), not the zip bytes, so it does not
  change with the zlib version that compressed it.
* ``meshray-pkg://<sha256>.whl`` -- a wheel for `py_modules`, unpacked and put
  on `sys.path`; the hash is of the file.
* ``meshray-pkg://<sha256>/<filename>`` -- one file kept verbatim under its
  name (pip reads a wheel's version and tags from its filename).

Packaging and unpacking are pure functions over bytes and directories; the
node-side cache decides where and when to unpack.
"""
from __future__ import annotations

import hashlib
import io
import os
import stat
import zipfile
from dataclasses import dataclass
from typing import Iterable

from meshray.runtime_env.gitignore import IgnoreRule, is_ignored, parse_patterns
from meshray.runtime_env.validation import (
    MAX_SIZE_ENV, PACKAGE_URI_SCHEME, is_package_uri, looks_like_local_path, max_package_bytes,
    validate_runtime_env,
)

__all__ = [
    "Package", "PackageError", "package_directory", "package_wheel_or_module", "package_file",
    "upload_plan", "parse_uri", "unpack_package", "uris_in", "verify_package",
    "IGNORE_GITIGNORE_ENV", "MAX_MEMBERS",
]

IGNORE_GITIGNORE_ENV = "MESHRAY_RUNTIME_ENV_IGNORE_GITIGNORE"
_FIXED_DATE = (1980, 1, 1, 0, 0, 0)        # the earliest a zip can say: same bytes every run
_MANIFEST_HEADER = b"meshray-pkg-v1\n"
_ALWAYS_SKIPPED = (".git",)                 # git's own store is never part of a tree's content
MAX_MEMBERS = 200_000                       # entries in one package zip


class PackageError(ValueError):
    """A package could not be built or does not match its URI."""


@dataclass(frozen=True)
class Package:
    """Bytes to make available to nodes under `uri` (content-addressed)."""
    uri: str
    data: bytes

    @property
    def sha256(self) -> str:
        return parse_uri(self.uri)[0]

    def __repr__(self) -> str:
        return f"Package({self.uri!r}, {len(self.data)} bytes)"


def parse_uri(uri: str) -> tuple[str, str, str | None]:
    """(sha256, kind, filename) where kind is 'dir', 'wheel' or 'file'."""
    if not is_package_uri(uri):
        raise PackageError(f"{uri!r} is not a meshray package URI "
                           f"(meshray-pkg://<sha256>.zip, .whl or /<filename>)")
    rest = uri[len(PACKAGE_URI_SCHEME):]
    sha = rest[:64]
    tail = rest[64:]
    if tail == ".zip":
        return sha, "dir", None
    if tail == ".whl":
        return sha, "wheel", None
    if tail[1:] in (".", ".."):
        raise PackageError(f"{uri!r} names no file")
    return sha, "file", tail[1:]


def _fmt(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB" if n >= 1024 * 1024 else f"{n} bytes"


def _walk(root: str, excludes: Iterable[str], use_gitignore: bool) -> tuple[list, list]:
    """Files and empty dirs to ship: [(rel, abs, size, mode)], [rel].

    Directories are pruned as soon as they are ignored, so the walk never
    descends into (and never stats) a large excluded tree.
    """
    exclude_rules = parse_patterns(excludes)
    files: list[tuple[str, str, int, int]] = []
    empty_dirs: list[str] = []

    def visit(abs_dir: str, rel_dir: str, rules: list[IgnoreRule], ancestors: frozenset) -> bool:
        gi = os.path.join(abs_dir, ".gitignore")
        if use_gitignore and os.path.isfile(gi):
            with open(gi, encoding="utf-8", errors="replace") as f:
                rules = rules + parse_patterns(f.read().splitlines(), rel_dir)
        shipped_any = False
        for name in sorted(os.listdir(abs_dir)):
            abs_path = os.path.join(abs_dir, name)
            rel = f"{rel_dir}/{name}" if rel_dir else name
            try:
                st = os.stat(abs_path)          # follows symlinks: ship what they point to
            except OSError:
                continue                        # dangling symlink: nothing to ship
            is_dir = stat.S_ISDIR(st.st_mode)
            if name in _ALWAYS_SKIPPED and is_dir:
                continue
            if is_ignored(rel, is_dir, exclude_rules) or is_ignored(rel, is_dir, rules):
                continue
            if is_dir:
                real = os.path.realpath(abs_path)
                if real in ancestors:
                    continue                    # a symlink loop
                if not visit(abs_path, rel, rules, ancestors | {real}):
                    empty_dirs.append(rel)
                shipped_any = True
            elif stat.S_ISREG(st.st_mode):
                files.append((rel, abs_path, st.st_size, st.st_mode))
                shipped_any = True
        return shipped_any

    visit(root, "", [], frozenset({os.path.realpath(root)}))
    return files, empty_dirs


def _size_error(what: str, path: str, total: int, cap: int, files: list,
                limit_env: str = MAX_SIZE_ENV) -> PackageError:
    biggest = sorted(files, key=lambda f: -f[2])[:3]
    listing = ", ".join(f"{rel} ({_fmt(size)})" for rel, _, size, _ in biggest)
    return PackageError(
        f"{what} {path} is {_fmt(total)}, over the {_fmt(cap)} limit for one runtime_env package"
        f" (largest: {listing}). Leave big files out with runtime_env['excludes'] or a .gitignore,"
        f" or raise the limit with {limit_env} (e.g. 500MiB).")


def _mode_bits(mode: int) -> int:
    return 0o755 if mode & 0o111 else 0o644


def _manifest_line(rel: str, mode_bits: int | None, digest: str | None) -> bytes:
    if mode_bits is None:
        return f"D {rel}\n".encode()
    return f"F {rel} {mode_bits:o} {digest}\n".encode()


def _build_zip(entries: list[tuple[str, bytes | None, int]]) -> tuple[bytes, str]:
    """Zip (rel, data-or-None-for-dir, mode) in the given order; (bytes, manifest sha256)."""
    manifest = hashlib.sha256(_MANIFEST_HEADER)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for rel, data, mode in entries:
            if data is None:
                info = zipfile.ZipInfo(rel + "/", _FIXED_DATE)
                info.external_attr = (stat.S_IFDIR | 0o755) << 16
                info.create_system = 3
                zf.writestr(info, b"")
                manifest.update(_manifest_line(rel, None, None))
                continue
            bits = _mode_bits(mode)
            info = zipfile.ZipInfo(rel, _FIXED_DATE)
            info.external_attr = (stat.S_IFREG | bits) << 16
            info.create_system = 3
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
            manifest.update(_manifest_line(rel, bits, hashlib.sha256(data).hexdigest()))
    return buf.getvalue(), manifest.hexdigest()


def package_directory(path: str, excludes: Iterable[str] = (), *, prefix: str = "",
                      max_bytes: int | None = None, limit_env: str = MAX_SIZE_ENV) -> Package:
    """Zip a directory deterministically: same content, same URI, on any machine.

    `.gitignore` files in the tree and `excludes` (gitignore syntax, relative
    to `path`) leave files out; `.git` is always left out. `prefix` puts the
    tree under one top-level directory (how a py_modules package keeps its
    import name). The cap (`max_bytes`, default MESHRAY_RUNTIME_ENV_MAX_SIZE or
    100 MiB; `limit_env` names the setting that raises it) counts uncompressed
    bytes and is checked before anything is read.
    """
    root = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.isdir(root):
        raise PackageError(f"cannot package {path!r}: not a directory (resolved to {root})")
    cap = max_package_bytes() if max_bytes is None else max_bytes
    use_gitignore = os.environ.get(IGNORE_GITIGNORE_ENV, "") in ("", "0")
    files, empty_dirs = _walk(root, list(excludes), use_gitignore)
    total = sum(f[2] for f in files)
    if total > cap:
        raise _size_error("directory", root, total, cap, files, limit_env)
    pre = prefix.strip("/") + "/" if prefix.strip("/") else ""
    entries: list[tuple[str, bytes | None, int]] = []
    for rel, abs_path, _, mode in files:
        with open(abs_path, "rb") as f:
            entries.append((pre + rel, f.read(), mode))
    entries += [(pre + rel, None, 0) for rel in empty_dirs]
    entries.sort(key=lambda e: e[0])
    data, digest = _build_zip(entries)
    return Package(f"{PACKAGE_URI_SCHEME}{digest}.zip", data)


def _read_capped(path: str, cap: int, what: str, limit_env: str = MAX_SIZE_ENV) -> bytes:
    size = os.path.getsize(path)
    if size > cap:
        raise _size_error(what, path, size, cap, [(os.path.basename(path), path, size, 0)],
                          limit_env)
    with open(path, "rb") as f:
        return f.read()


def package_file(path: str, *, max_bytes: int | None = None,
                 limit_env: str = MAX_SIZE_ENV) -> Package:
    """Ship one file verbatim under its own name (for pip's local wheels and sdists)."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    cap = max_package_bytes() if max_bytes is None else max_bytes
    data = _read_capped(path, cap, "file", limit_env)
    name = os.path.basename(path)
    return Package(f"{PACKAGE_URI_SCHEME}{hashlib.sha256(data).hexdigest()}/{name}", data)


def package_wheel_or_module(path: str, excludes: Iterable[str] = (), *,
                            max_bytes: int | None = None,
                            limit_env: str = MAX_SIZE_ENV) -> Package:
    """Package one `py_modules` entry so that its import name works on the node.

    A directory is zipped under its own name (`mypkg/` stays `import mypkg`),
    a single `.py` file likewise; a `.whl` is shipped as is and unpacked on
    the node, which is what installing a wheel amounts to for import purposes.
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    cap = max_package_bytes() if max_bytes is None else max_bytes
    if os.path.isdir(path):
        return package_directory(path, excludes, prefix=os.path.basename(path), max_bytes=cap,
                                 limit_env=limit_env)
    if path.endswith(".whl") and os.path.isfile(path):
        data = _read_capped(path, cap, "wheel", limit_env)
        if not zipfile.is_zipfile(io.BytesIO(data)):
            raise PackageError(f"py_modules entry {path} is not a valid wheel (not a zip file)")
        return Package(f"{PACKAGE_URI_SCHEME}{hashlib.sha256(data).hexdigest()}.whl", data)
    if path.endswith(".py") and os.path.isfile(path):
        data = _read_capped(path, cap, "module", limit_env)
        zipped, digest = _build_zip([(os.path.basename(path), data, os.stat(path).st_mode)])
        return Package(f"{PACKAGE_URI_SCHEME}{digest}.zip", zipped)
    raise PackageError(f"py_modules entry {path!r} must be a directory, a .whl file or a .py "
                       f"file, and must exist")


def upload_plan(runtime_env: dict | None, *, max_bytes: int | None = None,
                limit_env: str = MAX_SIZE_ENV) -> tuple[dict | None, list[Package]]:
    """Replace an env's local paths by package URIs; return it with the packages to store.

    Runs in the driver. The returned env is what tasks carry and what etcd may
    see; the packages are what the object store must hold so that nodes can
    fetch each URI they lack. `excludes` is consumed here (it only shapes the
    packages), so it does not split worker pools. `max_bytes` and `limit_env`:
    each package's cap and the setting that raises it (the job client uploads
    under its own cap).
    """
    env = validate_runtime_env(runtime_env)
    if not env:
        return env, []
    packages: dict[str, Package] = {}

    def add(pkg: Package) -> str:
        packages.setdefault(pkg.uri, pkg)
        return pkg.uri

    caps = {"max_bytes": max_bytes, "limit_env": limit_env}
    excludes = env.pop("excludes", None) or []
    wd = env.get("working_dir")
    if wd is not None and not is_package_uri(wd):
        env["working_dir"] = add(_named("working_dir", wd, package_directory, wd, excludes,
                                        **caps))
    if "py_modules" in env:
        env["py_modules"] = [
            m if is_package_uri(m) else
            add(_named("py_modules", m, package_wheel_or_module, m, excludes, **caps))
            for m in env["py_modules"]]
    if "pip" in env:
        reqs = []
        for req in env["pip"]["packages"]:
            if not is_package_uri(req) and looks_like_local_path(req) and os.path.exists(req):
                build = package_directory if os.path.isdir(req) else package_file
                req = add(_named("pip", req, build, req, **caps))
            reqs.append(req)
        env["pip"] = {**env["pip"], "packages": reqs}
    return env, list(packages.values())


def _named(field: str, value, build, *args, **kwargs) -> Package:
    """`build(*args)`, its PackageError naming the runtime_env field and value."""
    try:
        return build(*args, **kwargs)
    except PackageError as exc:
        raise PackageError(f"runtime_env[{field!r}]={value!r}: {exc}") from None


def uris_in(runtime_env: dict | None) -> list[str]:
    """Every package URI an (uploaded) env refers to: what a node must have before setup."""
    env = runtime_env or {}
    found = []
    if is_package_uri(env.get("working_dir")):
        found.append(env["working_dir"])
    found += [m for m in env.get("py_modules") or () if is_package_uri(m)]
    pip = env.get("pip")
    if isinstance(pip, dict):
        found += [r for r in pip.get("packages") or () if is_package_uri(r)]
    return list(dict.fromkeys(found))


def _safe_target(dest: str, name: str) -> str:
    """Where a zip member goes, refusing names that would escape `dest`."""
    if name.startswith("/") or "\\" in name or any(p == ".." for p in name.split("/")):
        raise PackageError(f"package member {name!r} has an unsafe path")
    target = os.path.normpath(os.path.join(dest, name))
    if not (target == dest or target.startswith(dest + os.sep)):
        raise PackageError(f"package member {name!r} escapes the package directory")
    return target


def _checked_members(zf: zipfile.ZipFile, max_bytes: int | None) -> list:
    """A zip's members, refused when one is a link or the whole is too big.

    The sizes checked are those the members declare, which are also the most
    zipfile inflates each to, so a small zip cannot expand past the cap.
    """
    members = zf.infolist()
    if len(members) > MAX_MEMBERS:
        raise PackageError(f"package has {len(members)} entries, over the {MAX_MEMBERS} limit")
    cap = max_package_bytes() if max_bytes is None else max_bytes
    total = 0
    for info in members:
        kind = stat.S_IFMT(info.external_attr >> 16) if info.create_system == 3 else 0
        if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
            raise PackageError(f"package member {info.filename!r} is not a plain file or "
                               "directory (links and devices are refused)")
        total += info.file_size
        if total > cap:
            raise PackageError(f"package unpacks to over {_fmt(cap)}, the limit for one "
                               "runtime_env package")
    return members


def _unzip(data: bytes, dest: str | None, max_bytes: int | None = None) -> str:
    """Extract into `dest` with modes restored; return the manifest sha256 of what was written.

    With `dest` None nothing is written: the members are checked and hashed only.
    """
    manifest = hashlib.sha256(_MANIFEST_HEADER)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in _checked_members(zf, max_bytes):
            target = _safe_target(dest or os.sep + "package", info.filename)
            if info.is_dir():
                if dest is not None:
                    os.makedirs(target, exist_ok=True)
                manifest.update(_manifest_line(info.filename.rstrip("/"), None, None))
                continue
            content = zf.read(info)
            bits = _mode_bits((info.external_attr >> 16) & 0o777)
            if dest is not None:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, "wb") as f:
                    f.write(content)
                os.chmod(target, bits)
            manifest.update(_manifest_line(info.filename, bits, hashlib.sha256(content).hexdigest()))
    return manifest.hexdigest()


def verify_package(uri: str, data: bytes, *, max_bytes: int | None = None) -> None:
    """Raise PackageError unless `data` is exactly the package `uri` names and is safe
    to unpack: its hash, member paths (none absolute, none with ``..``), no links,
    and its unpacked size within `max_bytes`. Writes nothing: for bytes a client sent."""
    sha, kind, _filename = parse_uri(uri)
    actual = hashlib.sha256(data).hexdigest()
    if kind != "file":
        try:
            manifest = _unzip(data, None, max_bytes)
        except zipfile.BadZipFile as exc:
            raise PackageError(f"{uri} is not a valid zip: {exc}") from None
        actual = manifest if kind == "dir" else actual
    if actual != sha:
        raise PackageError(f"content of {uri} does not match its hash (got {actual})")


def unpack_package(uri: str, data: bytes, dest: str) -> str:
    """Materialise a package's bytes in the empty directory `dest`; return the usable path.

    The content is checked against the URI's hash, so a corrupt or substituted
    transfer fails here rather than running as if it were the user's code.
    Returns `dest` for trees and wheels, or the file's path inside `dest`.
    """
    sha, kind, filename = parse_uri(uri)
    dest = os.path.abspath(dest)
    os.makedirs(dest, exist_ok=True)
    if kind in ("wheel", "file"):
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha:
            raise PackageError(f"content of {uri} does not match its hash (got sha256 {actual})")
        if kind == "file":
            path = os.path.join(dest, filename)
            with open(path, "wb") as f:
                f.write(data)
            return path
        try:
            _unzip(data, dest)
        except zipfile.BadZipFile as exc:
            raise PackageError(f"{uri} is not a valid wheel: {exc}") from exc
        return dest
    try:
        actual = _unzip(data, dest)
    except zipfile.BadZipFile as exc:
        raise PackageError(f"{uri} is not a valid package zip: {exc}") from exc
    if actual != sha:
        raise PackageError(f"content of {uri} does not match its hash (got manifest {actual})")
    return dest
