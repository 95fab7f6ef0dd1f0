"""init() takes every argument Ray's init() takes; no-ops warn once; unknown names are TypeErrors."""
import inspect
import logging
import warnings

import pytest

import meshray
from meshray.core import init_args

# Ray's ray.init named parameters (its signature), and the hidden ones it reads from **kwargs.
RAY_NAMED = ["address", "num_cpus", "num_gpus", "resources", "labels", "object_store_memory",
             "local_mode", "ignore_reinit_error", "include_dashboard", "dashboard_host",
             "dashboard_port", "job_config", "configure_logging", "logging_level",
             "logging_format", "logging_config", "log_to_driver", "namespace", "runtime_env",
             "enable_resource_isolation", "system_reserved_cpu", "system_reserved_memory"]


def test_signature_has_rays_named_parameters():
    params = inspect.signature(meshray.init).parameters
    assert [name for name in params if name != "kwargs"] == RAY_NAMED


def test_unknown_argument_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match=r"init\(\) got an unexpected keyword argument 'num_cpu'"):
        meshray.init(num_cpu=2)
    with pytest.raises(TypeError, match=r"'bogus', 'storage'"):
        meshray.init(bogus=1, storage="/tmp")


def test_every_hidden_ray_argument_is_known():
    init_args.check_unknown({name: None for name in init_args.HIDDEN_ARGUMENTS})


def test_arguments_with_no_effect_are_named_with_the_reason():
    ignored = dict(init_args.ignored_arguments({
        "local_mode": True, "include_dashboard": True, "_system_config": {"x": 1},
        "dashboard_port": 8265, "_temp_dir": "/tmp/x"}))
    assert set(ignored) == {"local_mode", "_system_config", "dashboard_port", "_temp_dir"}
    assert "dashboard" in ignored["dashboard_port"]


def test_node_arguments_are_honoured_for_the_node_init_starts_and_warn_when_joining():
    given = {"include_dashboard": False, "_metrics_export_port": 9000}
    assert init_args.ignored_arguments(given) == []           # init() starts its own node
    ignored = dict(init_args.ignored_arguments(given, joining=True))
    assert set(ignored) == {"include_dashboard", "_metrics_export_port"}
    assert "serve Prometheus metrics (/metrics)" in ignored["_metrics_export_port"]
    assert "meshray start" in ignored["include_dashboard"]
    # A dashboard asked for is there either way: only False asks for something.
    assert init_args.ignored_arguments({"include_dashboard": True}, joining=True) == []
    assert init_args.ignored_arguments({"include_dashboard": None}, joining=True) == []


@pytest.mark.parametrize("bad", [-1, 65536, "9000", True, 1.5])
def test_metrics_export_port_must_be_a_port_number(bad):
    with pytest.raises(ValueError, match=rf"_metrics_export_port={bad!r} must be a port number"):
        init_args.check_metrics_port(bad)
    init_args.check_metrics_port(None)
    init_args.check_metrics_port(0)
    init_args.check_metrics_port(9000)


def test_ray_defaults_do_not_warn():
    assert init_args.ignored_arguments({
        "local_mode": False, "include_dashboard": None, "dashboard_host": "127.0.0.1",
        "job_config": None, "_system_config": {}, "enable_resource_isolation": False}) == []
    assert init_args.ignored_arguments({"include_dashboard": False}) == []


def test_warns_once_per_argument(monkeypatch):
    monkeypatch.setattr(init_args, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        init_args.warn_ignored({"_metrics_export_port": 9000}, joining=True)
        init_args.warn_ignored({"_metrics_export_port": 9000}, joining=True)
    assert len(caught) == 1
    assert issubclass(caught[0].category, UserWarning)
    assert "_metrics_export_port=9000 has no effect on meshray" in str(caught[0].message)


def test_allow_multiple_is_refused_as_ray_does_without_a_client():
    with pytest.raises(RuntimeError, match="allow_multiple"):
        init_args.check_unknown({"allow_multiple": True})


def test_logging_level_and_format_configure_the_meshray_logger():
    logger = logging.getLogger("meshray")
    level, handlers = logger.level, list(logger.handlers)
    try:
        init_args.configure_logging(True, "debug", "%(message)s")
        assert logger.level == logging.DEBUG
        assert [h.formatter._fmt for h in logger.handlers if getattr(h, "_meshray_init", 0)] \
            == ["%(message)s"]
        init_args.configure_logging(False, "error", None)     # configure_logging=False
        assert logger.level == logging.DEBUG
        with pytest.raises(ValueError, match="logging_level='loud'"):
            init_args.configure_logging(True, "loud", None)
    finally:
        logger.setLevel(level)
        logger.handlers[:] = handlers
