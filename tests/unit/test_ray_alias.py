"""The `ray` alias finder's answers, asked directly (nothing installed here)."""
import pytest

from meshray.core.ray_alias import (
    ENV_VAR,
    MissingRayLibraryError,
    RayAliasFinder,
    missing_library,
    with_alias_env,
)


def test_ray_names_map_to_meshray_modules():
    finder = RayAliasFinder()
    assert finder.find_spec("ray").name == "ray"
    assert finder.find_spec("ray").loader.target == "meshray"
    assert finder.find_spec("ray.util.scheduling_strategies").loader.target == \
        "meshray.util.scheduling_strategies"
    assert finder.find_spec("ray.remote_function").loader.target == "meshray.core.remote_function"
    assert finder.find_spec("ray.util").submodule_search_locations is not None
    assert finder.find_spec("ray.runtime_context").submodule_search_locations is None
    assert finder.find_spec("numpy") is None and finder.find_spec("meshray.util") is None


@pytest.mark.parametrize("name, needle", [
    ("ray.data", "meshray does not provide Ray Data (ray.data)"),
    ("ray.rllib.algorithms", "meshray does not provide RLlib (ray.rllib)"),
    ("meshray.tune", "meshray does not provide Ray Tune (ray.tune)"),   # `from ray import tune`
    ("ray._private", "meshray does not provide this part of Ray"),
    ("ray.util.no_such_module", "meshray does not provide this part of Ray"),
])
def test_missing_parts_are_refused_by_their_ray_name(name, needle):
    with pytest.raises(ModuleNotFoundError) as info:
        RayAliasFinder().find_spec(name)
    assert needle in str(info.value)
    assert info.value.name.startswith("ray")


def test_alias_env_keeps_the_jobs_own_variables():
    env = with_alias_env({"env_vars": {"A": "1"}, "working_dir": "."})
    assert env == {"env_vars": {"A": "1", ENV_VAR: "1"}, "working_dir": "."}
    assert with_alias_env(None) == {"env_vars": {ENV_VAR: "1"}}


@pytest.mark.parametrize("name, library", [("data", "Ray Data"), ("tune", "Ray Tune"),
                                           ("serve", "Ray Serve"), ("workflow", "Ray Workflows")])
def test_attribute_access_to_a_missing_library_names_it(name, library):
    # `import meshray as ray; ray.data`: Ray would load the library here.
    import meshray
    with pytest.raises(MissingRayLibraryError) as info:
        getattr(meshray, name)
    assert isinstance(info.value, AttributeError) and info.value.name == name
    assert f"meshray does not provide {library} (ray.{name})" in str(info.value)
    assert not hasattr(meshray, name)
    assert getattr(meshray, name, "default") == "default"


def test_other_missing_attributes_stay_plain_attribute_errors():
    import meshray
    with pytest.raises(AttributeError, match="module 'meshray' has no attribute 'no_such_name'$"):
        meshray.no_such_name
    assert missing_library("no_such_name") is None
    assert meshray.util.__name__ == "meshray.util"       # real submodules are untouched
