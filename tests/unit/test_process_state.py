"""core.state.ensure_core: how modules below the public API connect on first use."""
import pytest

import meshray
from meshray.core import state as state_mod


@pytest.fixture
def bare_state(monkeypatch):
    monkeypatch.setattr(state_mod.state, "core", None)
    monkeypatch.setattr(state_mod.state, "auto_init", None)
    return state_mod.state


def test_importing_meshray_registers_init_as_the_hook():
    assert state_mod.state.auto_init is meshray._api.init


def test_ensure_core_connects_once_through_the_hook(bare_state):
    core = object()
    calls = []

    def connect():
        calls.append(1)
        bare_state.core = core

    bare_state.auto_init = connect
    assert state_mod.ensure_core() is core
    assert state_mod.ensure_core() is core
    assert calls == [1]


def test_ensure_core_without_a_hook_says_to_call_init(bare_state):
    with pytest.raises(RuntimeError, match=r"meshray\.init\(\)"):
        state_mod.ensure_core()
