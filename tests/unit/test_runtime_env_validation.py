"""runtime_env validation, normalisation and parent->child merging (pure)."""
from __future__ import annotations

import os
import types

import pytest

from meshray.exceptions import RuntimeEnvSetupError
from meshray.runtime_env import (
    CONFIG_DEFAULTS, merge_runtime_envs, runtime_env_config, validate_runtime_env,
)
from meshray.runtime_env.validation import (
    DEFAULT_MAX_PACKAGE_BYTES, max_package_bytes, parse_size,
)

URI = "meshray-pkg://" + "ab" * 32 + ".zip"


def test_none_and_empty():
    assert validate_runtime_env(None) is None
    assert validate_runtime_env({}) == {}


def test_not_a_dict():
    with pytest.raises(TypeError, match="runtime_env must be a dict, got list"):
        validate_runtime_env(["pip"])


def test_unknown_field_named():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['workdir'\]"):
        validate_runtime_env({"workdir": "."})


@pytest.mark.parametrize("field,value,advice", [
    ("conda", {"dependencies": []}, "pip"),
    ("container", {"image": "x"}, "image"),
    ("image_uri", "docker.io/x", "image"),
    ("uv", ["requests"], "'pip'"),
])
def test_unsupported_fields_say_so(field, value, advice):
    with pytest.raises(ValueError) as info:
        validate_runtime_env({field: value})
    msg = str(info.value)
    assert f"['{field}'] are not supported by meshray" in msg
    assert advice in msg


def test_pip_with_unsupported_manager_names_both():
    with pytest.raises(ValueError) as info:
        validate_runtime_env({"pip": ["requests"], "conda": "env"})
    msg = str(info.value)
    assert "'conda'" in msg and "'pip' and 'conda' cannot be combined" in msg


def test_env_vars_types():
    assert validate_runtime_env({"env_vars": {"A": "1"}}) == {"env_vars": {"A": "1"}}
    with pytest.raises(TypeError, match="env_vars"):
        validate_runtime_env({"env_vars": {"A": 1}})
    with pytest.raises(ValueError, match="invalid variable name"):
        validate_runtime_env({"env_vars": {"A=B": "1"}})


def test_working_dir_normalised_to_absolute(tmp_path, monkeypatch):
    (tmp_path / "proj").mkdir()
    monkeypatch.chdir(tmp_path)
    env = validate_runtime_env({"working_dir": "proj"})
    assert env["working_dir"] == str(tmp_path / "proj")
    assert validate_runtime_env({"working_dir": tmp_path / "proj"})["working_dir"] == str(tmp_path / "proj")


def test_working_dir_missing_or_file(tmp_path):
    with pytest.raises(ValueError, match=r"working_dir'\]='.*nope' does not exist"):
        validate_runtime_env({"working_dir": str(tmp_path / "nope")})
    f = tmp_path / "f.txt"
    f.write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        validate_runtime_env({"working_dir": str(f)})
    with pytest.raises(TypeError, match="working_dir"):
        validate_runtime_env({"working_dir": 3})


def test_remote_uris_rejected_but_our_uris_kept():
    with pytest.raises(ValueError, match="remote URIs are not supported"):
        validate_runtime_env({"working_dir": "s3://bucket/x.zip"})
    assert validate_runtime_env({"working_dir": URI})["working_dir"] == URI
    with pytest.raises(ValueError, match="not a valid meshray package URI"):
        validate_runtime_env({"working_dir": "meshray-pkg://xyz.zip"})


def test_py_modules(tmp_path):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    whl = tmp_path / "x-1.0-py3-none-any.whl"
    whl.write_bytes(b"zip")
    env = validate_runtime_env({"py_modules": [str(pkg), str(whl), URI]})
    assert env["py_modules"] == [str(pkg), str(whl), URI]
    with pytest.raises(TypeError, match="must be a list"):
        validate_runtime_env({"py_modules": str(pkg)})
    with pytest.raises(ValueError, match=r"py_modules'\]\[0\]=.* does not exist"):
        validate_runtime_env({"py_modules": [str(tmp_path / "missing")]})
    txt = tmp_path / "notes.txt"
    txt.write_text("x")
    with pytest.raises(ValueError, match="not a .whl wheel or a .py module"):
        validate_runtime_env({"py_modules": [str(txt)]})


def test_py_modules_accepts_module_objects():
    env = validate_runtime_env({"py_modules": [types, pytest]})
    assert env["py_modules"][0].endswith("types.py")
    assert os.path.isdir(env["py_modules"][1])


def test_pip_forms_normalise_to_dict(tmp_path):
    assert validate_runtime_env({"pip": ["requests", " ", "numpy>=1"]})["pip"] == {
        "packages": ["requests", "numpy>=1"], "pip_check": False}
    d = validate_runtime_env({"pip": {"packages": ["x"], "pip_check": True,
                                      "pip_version": "==23.2.1"}})["pip"]
    assert d == {"packages": ["x"], "pip_check": True, "pip_version": "==23.2.1"}
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['pip_chek'\]"):
        validate_runtime_env({"pip": {"packages": [], "pip_chek": True}})
    with pytest.raises(TypeError, match="pip_check"):
        validate_runtime_env({"pip": {"packages": [], "pip_check": "yes"}})
    with pytest.raises(TypeError, match="entry 0 must be a str"):
        validate_runtime_env({"pip": [1]})


def test_pip_requirements_file_is_read_on_the_driver(tmp_path):
    whl = tmp_path / "w" / "x-1.0-py3-none-any.whl"
    whl.parent.mkdir()
    whl.write_bytes(b"zip")
    (tmp_path / "more.txt").write_text("pendulum==2.1.2\n")
    req = tmp_path / "requirements.txt"
    req.write_text("# comment\nrequests  # inline\n\n-r more.txt\n./w/x-1.0-py3-none-any.whl\n"
                   "--index-url http://127.0.0.1:9/simple\n")
    env = validate_runtime_env({"pip": str(req)})
    assert env["pip"]["packages"] == ["requests", "pendulum==2.1.2", str(whl),
                                      "--index-url http://127.0.0.1:9/simple"]
    with pytest.raises(ValueError, match="neither a list of requirements nor an existing"):
        validate_runtime_env({"pip": str(tmp_path / "missing.txt")})


def test_pip_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-1.0-py3-none-any.whl").write_bytes(b"x")
    env = validate_runtime_env({"pip": ["a-1.0-py3-none-any.whl"]})
    assert env["pip"]["packages"] == [str(tmp_path / "a-1.0-py3-none-any.whl")]
    with pytest.raises(RuntimeEnvSetupError,
                       match="looks like a local path but does not exist") as info:
        validate_runtime_env({"pip": ["./missing-1.0-py3-none-any.whl"]})
    assert isinstance(info.value.__cause__, FileNotFoundError)   # the cause travels with it


def test_config_defaults_and_checks():
    env = validate_runtime_env({"config": {"setup_timeout_seconds": 30}})
    assert env["config"] == {"setup_timeout_seconds": 30, "eager_install": True}
    assert runtime_env_config(None) == CONFIG_DEFAULTS
    assert runtime_env_config({"config": {"eager_install": False}})["eager_install"] is False
    assert validate_runtime_env({"config": {"setup_timeout_seconds": -1}})
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match="setup_timeout_seconds"):
            validate_runtime_env({"config": {"setup_timeout_seconds": bad}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['timeout'\]"):
        validate_runtime_env({"config": {"timeout": 3}})


def test_excludes_type():
    assert validate_runtime_env({"excludes": ["*.log"]}) == {"excludes": ["*.log"]}
    with pytest.raises(TypeError, match="excludes"):
        validate_runtime_env({"excludes": "*.log"})


def test_validation_is_idempotent(tmp_path):
    (tmp_path / "d").mkdir()
    env = validate_runtime_env({"working_dir": str(tmp_path / "d"), "pip": ["x"],
                                "config": {}, "env_vars": {"A": "b"}})
    assert validate_runtime_env(env) == env


def test_merge_env_vars_child_wins_other_fields_replaced():
    parent = {"py_modules": ["p"], "pip": {"packages": ["requests"], "pip_check": False},
              "env_vars": {"a": "b", "x": "parent"}}
    child = {"py_modules": ["c"], "env_vars": {"c": "d", "x": "child"}}
    merged = merge_runtime_envs(parent, child)
    assert merged == {"py_modules": ["c"], "pip": {"packages": ["requests"], "pip_check": False},
                      "env_vars": {"a": "b", "x": "child", "c": "d"}}
    assert parent["env_vars"] == {"a": "b", "x": "parent"}      # inputs untouched
    merged["pip"]["packages"].append("y")
    assert parent["pip"]["packages"] == ["requests"]


def test_merge_with_missing_sides():
    assert merge_runtime_envs(None, None) is None
    assert merge_runtime_envs({"env_vars": {"a": "1"}}, None) == {"env_vars": {"a": "1"}}
    assert merge_runtime_envs(None, {"pip": {"packages": []}}) == {"pip": {"packages": []}}
    assert merge_runtime_envs({"working_dir": URI}, {"env_vars": {"a": "1"}}) == {
        "working_dir": URI, "env_vars": {"a": "1"}}


def test_size_parsing():
    assert parse_size("100MiB") == 100 * 1024 * 1024
    assert parse_size("2 GB") == 2 * 1000 ** 3
    assert parse_size(1234) == 1234
    with pytest.raises(ValueError, match="X=.*not a size"):
        parse_size("lots", "X")
    assert max_package_bytes({}) == DEFAULT_MAX_PACKAGE_BYTES
    assert max_package_bytes({"MESHRAY_RUNTIME_ENV_MAX_SIZE": "1KiB"}) == 1024
