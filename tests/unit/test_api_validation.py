"""The public API's number checks: nan, inf, negatives and wrong types fail in the caller."""
import pytest

from meshray.core import validation
from meshray.core.options import InvalidOptionTypeError

NAN, INF = float("nan"), float("inf")


def test_timeout_accepts_none_zero_and_numbers_and_treats_inf_as_forever():
    assert validation.check_timeout("get()", None) is None
    assert validation.check_timeout("get()", 0) == 0.0
    assert validation.check_timeout("get()", 2.5) == 2.5
    assert validation.check_timeout("get()", INF) is None


@pytest.mark.parametrize("bad", [NAN, -1, -0.001, -INF])
def test_timeout_rejects_nan_and_negatives_naming_the_value(bad):
    with pytest.raises(ValueError, match=r"get\(\) argument timeout=.*must be a number >= 0"):
        validation.check_timeout("get()", bad)


@pytest.mark.parametrize("bad", ["1", True, [1]])
def test_timeout_rejects_wrong_types_as_type_error(bad):
    with pytest.raises(TypeError, match=r"wait\(\) argument timeout="):
        validation.check_timeout("wait()", bad)


@pytest.mark.parametrize("bad", [NAN, INF, -1])
def test_quantities_must_be_finite_and_non_negative(bad):
    with pytest.raises(ValueError, match=rf"init\(\) argument num_cpus={bad!r} must be a finite"):
        validation.check_quantity("init()", "num_cpus", bad)
    validation.check_quantity("init()", "num_cpus", 0)
    validation.check_quantity("init()", "num_gpus", 1.5)
    with pytest.raises(InvalidOptionTypeError, match="num_gpus='2'"):
        validation.check_quantity("init()", "num_gpus", "2")


def test_byte_counts_are_positive_whole_numbers():
    assert validation.check_byte_count("init()", "object_store_memory", 2e9) == 2_000_000_000
    assert validation.check_byte_count("init()", "object_store_memory", None) is None
    for bad in (NAN, INF, 0, -5, 1.5):
        with pytest.raises(ValueError, match="object_store_memory=.*positive whole number"):
            validation.check_byte_count("init()", "object_store_memory", bad)
    with pytest.raises(TypeError, match="object_store_memory='1GB'"):
        validation.check_byte_count("init()", "object_store_memory", "1GB")


def test_custom_resources_name_the_bad_entry():
    validation.check_resources("init()", {"ssd": 2, "zero": 0})
    with pytest.raises(ValueError, match=r"resources\['ssd'\] must be finite, got nan"):
        validation.check_resources("init()", {"ssd": NAN})
    with pytest.raises(ValueError, match=r"resources\['ssd'\] cannot be negative"):
        validation.check_resources("init()", {"ssd": -1})
    with pytest.raises(ValueError, match="resource names must be non-empty"):
        validation.check_resources("init()", {"": 1})
    with pytest.raises(ValueError, match="num_cpus"):
        validation.check_resources("init()", {"CPU": 1})
    with pytest.raises(TypeError, match="must be a dict"):
        validation.check_resources("init()", [("ssd", 1)])



def test_wait_and_cancel_name_their_first_parameter_as_ray():
    import inspect

    import meshray
    assert list(inspect.signature(meshray.wait).parameters)[0] == "ray_waitables"
    assert list(inspect.signature(meshray.cancel).parameters) == \
        ["ray_waitable", "force", "recursive"]
    # The keyword form reaches the check (no cluster is needed to refuse it).
    with pytest.raises(TypeError, match="ray_waitable must be an ObjectRef or "
                                        "ObjectRefGenerator, got str"):
        meshray.cancel(ray_waitable="not a ref")
