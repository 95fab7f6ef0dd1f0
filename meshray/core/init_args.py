"""Which of Ray's `init()` arguments meshray honours, and what it says about the rest.

Every argument Ray's `init` accepts is accepted here, so a Ray program's
call runs unchanged; one that would silently do nothing instead warns once
per process, naming itself. Some only shape the node `init()` starts
(`include_dashboard=False`, `_metrics_export_port`): honoured there, they warn
when joining a cluster, whose nodes were set up by `meshray start`. A name
Ray does not accept is a TypeError, as Python raises for any function.
docs/compatibility.md has the table.
"""
from __future__ import annotations

import logging
import threading
import warnings

__all__ = ["HIDDEN_ARGUMENTS", "MESHRAY_ARGUMENTS", "check_unknown", "check_metrics_port",
           "ignored_arguments", "warn_ignored", "configure_logging"]

# Ray's keyword-only arguments that it reads from **kwargs (its "hidden" ones).
HIDDEN_ARGUMENTS = frozenset({
    "_cgroup_path", "_enable_object_reconstruction", "_plasma_directory",
    "object_spilling_directory", "_node_ip_address", "_driver_object_store_memory", "_memory",
    "_redis_username", "_redis_password", "_temp_dir", "_metrics_export_port", "_system_config",
    "_tracing_startup_hook", "_node_name", "_skip_env_hook", "allow_multiple",
})
# meshray's own (private) ones.
MESHRAY_ARGUMENTS = frozenset({"_token", "_lease_ttl"})

# Argument -> why it has no effect here. Reported only when the value asks
# for something (is not Ray's default: None, False, {} or the one below).
_NO_EFFECT = {
    "local_mode": "tasks always run in worker processes (Ray deprecates local mode too)",
    "dashboard_host": "every node serves its dashboard on its own --dashboard-port",
    "dashboard_port": "every node serves its dashboard on its own --dashboard-port",
    "job_config": "meshray has no JobConfig; pass runtime_env= and namespace= to init()",
    "logging_config": "worker logging is not configured by the driver; "
                      "set MESHRAY_LOG_LEVEL for node daemons and workers",
    "enable_resource_isolation": "meshray does not reserve cgroup resources for its daemons",
    "system_reserved_cpu": "meshray does not reserve cgroup resources for its daemons",
    "system_reserved_memory": "meshray does not reserve cgroup resources for its daemons",
    "_cgroup_path": "meshray does not reserve cgroup resources for its daemons",
    "_enable_object_reconstruction": "lost objects are not rebuilt from lineage",
    "_plasma_directory": "the object store lives in the node's shared-memory session dir",
    "object_spilling_directory": "nodes choose where to spill (meshray start options)",
    "_node_ip_address": "a node's address is set when the node starts (meshray start --host)",
    "_driver_object_store_memory": "drivers have no separate store (deprecated in Ray too)",
    "_memory": "there is no 'memory' resource unless declared with resources=",
    "_redis_username": "meshray has no Redis; the cluster token authenticates",
    "_redis_password": "meshray has no Redis; the cluster token authenticates",
    "_temp_dir": "node session dirs live under MESHRAY_RUN_DIR",
    "_system_config": "there is no RayConfig; meshray reads MESHRAY_* environment variables",
    "_tracing_startup_hook": "meshray has no tracing hook",
    "_node_name": "node names are their ids",
}
# Honoured for the node init() starts; no effect on a cluster it joins.
_NO_EFFECT_WHEN_JOINING = {
    "include_dashboard": "the nodes of a cluster being joined serve their dashboard as "
                         "`meshray start` set them up",
    "_metrics_export_port": "the nodes of a cluster being joined serve Prometheus metrics "
                            "(/metrics) on the port `meshray start --metrics-export-port` gave "
                            "them",
}
_RAY_DEFAULTS = {"dashboard_host": "127.0.0.1"}   # besides None, False and {}

_warned: set = set()
_warned_lock = threading.Lock()


def check_unknown(kwargs: dict) -> None:
    """TypeError naming every keyword that neither Ray's init() nor meshray's takes."""
    unknown = [name for name in kwargs if name not in HIDDEN_ARGUMENTS | MESHRAY_ARGUMENTS]
    if len(unknown) == 1:
        raise TypeError(f"init() got an unexpected keyword argument {unknown[0]!r}")
    if unknown:
        raise TypeError("init() got unexpected keyword arguments "
                        + ", ".join(repr(name) for name in unknown))
    if kwargs.get("allow_multiple"):
        raise RuntimeError("init(allow_multiple=True) is for Ray Client connections "
                           "(ray:// addresses), which meshray does not have; drop the argument")


def check_metrics_port(value) -> None:
    """`_metrics_export_port` must be a port number (0: a free one), or None."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError(f"init() argument _metrics_export_port={value!r} must be a port "
                         f"number 0..65535 (0: a free port) or None")


def _asks_for_something(name: str, value) -> bool:
    if name == "include_dashboard":
        return value is False       # True or None: the nodes serve one either way
    return not (value is None or value is False or value == {}
                or value == _RAY_DEFAULTS.get(name))


def ignored_arguments(given: dict, joining: bool = False) -> list[tuple[str, str]]:
    """(name, why) for each given argument that asks for something meshray does not do
    (`joining`: init() joins a cluster rather than starting its own node)."""
    reasons = {**_NO_EFFECT, **(_NO_EFFECT_WHEN_JOINING if joining else {})}
    return [(name, reasons[name]) for name, value in given.items()
            if name in reasons and _asks_for_something(name, value)]


def warn_ignored(given: dict, joining: bool = False) -> None:
    """One UserWarning per argument per process that has no effect here."""
    for name, why in ignored_arguments(given, joining):
        with _warned_lock:
            if name in _warned:
                continue
            _warned.add(name)
        warnings.warn(f"init() argument {name}={given[name]!r} has no effect on meshray: {why}",
                      UserWarning, stacklevel=3)


def _level(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"init() argument logging_level={value!r} must be a logging level "
                         f"(an int, or a name such as 'info')")
    if isinstance(value, int):
        return value
    level = logging.getLevelName(value.upper())
    if not isinstance(level, int):
        raise ValueError(f"init() argument logging_level={value!r} is not a logging level name "
                         f"(expected one of debug, info, warning, error, critical)")
    return level


def configure_logging(enabled: bool, level, fmt: str | None) -> None:
    """Ray's configure_logging/logging_level/logging_format, for the "meshray" logger.

    Only what the caller asks for changes: a level sets the logger's level; a
    format installs one handler with it (replacing the one installed by an
    earlier init)."""
    if not enabled:
        return
    logger = logging.getLogger("meshray")
    if level is not None:
        logger.setLevel(_level(level))
    if fmt is not None:
        if not isinstance(fmt, str):
            raise ValueError(f"init() argument logging_format={fmt!r} must be a str")
        for handler in list(logger.handlers):
            if getattr(handler, "_meshray_init", False):
                logger.removeHandler(handler)
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(fmt))
        handler._meshray_init = True
        logger.addHandler(handler)
