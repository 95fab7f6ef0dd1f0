"""The committed generated gRPC code matches proto/*.proto."""
from __future__ import annotations

import importlib.util
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh(tmp_path):
    pytest.importorskip("grpc_tools")
    spec = importlib.util.spec_from_file_location("generate", REPO / "proto" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    generate.generate(tmp_path)
    committed = REPO / "meshray" / "rpc" / "generated"
    fresh = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert fresh == sorted(p.name for p in committed.iterdir() if p.is_file())
    for name in fresh:
        assert (tmp_path / name).read_text() == (committed / name).read_text(), (
            f"{name} is stale: run `python proto/generate.py` and commit the result")
