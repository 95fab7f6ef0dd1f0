"""The public functions of meshray, with Ray Core's names and behaviour."""
from __future__ import annotations

import atexit
import inspect
import logging
import os
import sys

from meshray.actor import ActorClass, ActorHandle, get_actor, method
from meshray.common import ids
from meshray.core import init_args, state as state_mod, validation
from meshray.core.core_worker import CoreWorker
from meshray.core.object_ref import ObjectRef, ObjectRefGenerator
from meshray.core.remote_function import RemoteFunction
from meshray.runtime_context import dashboard_url_of, get_runtime_context

__all__ = [
    "init", "shutdown", "is_initialized", "remote", "get", "put", "wait", "cancel",
    "cluster_resources", "available_resources", "nodes", "get_gpu_ids", "kill", "get_actor",
    "method",
]

log = logging.getLogger(__name__)
_state = state_mod.state


def is_initialized() -> bool:
    return _state.core is not None


def _resolve_address(address: str | None) -> str | None:
    if address is None:
        address = os.environ.get("MESHRAY_ADDRESS") or os.environ.get("RAY_ADDRESS") or None
    if address in (None, "", "local"):
        return None
    if address.startswith("etcd://"):
        address = address[len("etcd://"):]
    elif address.startswith("meshray://"):
        address = address[len("meshray://"):]
    return address


def _find_local_node(etcd: str | None):
    """(record, refused): a running node on this machine (joined to `etcd`, or any
    when None) or None, and why other records were not trusted."""
    from meshray.node import registry
    scan = registry.scan_records()      # UnsafePathError if the run dir is not ours
    for message in scan.refused:
        log.warning("ignoring %s", message)
    records = scan.records
    if etcd is not None:
        wanted = set(etcd.split(","))
        records = [r for r in records if wanted & set(r.get("etcd", "").split(","))]
    # MESHRAY_PREFERRED_NODE picks one; else nodes started by `meshray start`,
    # then the longest-running one.
    preferred = os.environ.get("MESHRAY_PREFERRED_NODE", "")
    records.sort(key=lambda r: (r.get("node_id") != preferred, not r.get("cli"),
                                r.get("started_at", 0), r.get("node_id")))
    return (records[0] if records else None), scan.refused


def _check_etcd_reachable(endpoints: str, token: str | None = None,
                          timeout: float = 5.0) -> None:
    """Prove etcd answers (and, with the cluster token, that the credentials
    derived from it are accepted) before looking for a node joined to it."""
    from meshray.coordination.client import Coordinator
    try:
        from meshray import security
        coordinator = Coordinator(endpoints.split(","), timeout=timeout,
                                  **security.etcd_client_options(token=token))
    except ConnectionError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ConnectionError(f"could not reach etcd at {endpoints}: {exc}") from exc
    coordinator.close()


def init(address: str | None = None, *, num_cpus=None, num_gpus=None, resources=None,
         labels=None, object_store_memory: int | None = None, local_mode: bool = False,
         ignore_reinit_error: bool = False, include_dashboard: bool | None = None,
         dashboard_host: str = "127.0.0.1", dashboard_port: int | None = None,
         job_config=None, configure_logging: bool = True, logging_level=None,
         logging_format: str | None = None, logging_config=None,
         log_to_driver: bool | None = None, namespace: str | None = None,
         runtime_env: dict | None = None, enable_resource_isolation: bool = False,
         system_reserved_cpu: float | None = None, system_reserved_memory: int | None = None,
         **kwargs):
    """Connect this process to a meshray cluster, starting one if needed.

    With no address (and no MESHRAY_ADDRESS) a private cluster starts here: an
    etcd member and a node daemon as child processes, on free loopback ports,
    in a temp dir -- all gone again after shutdown() or when this process
    exits, however it exits. Takes every argument Ray's init() takes; those
    with no effect here warn once (core/init_args.py).
    """
    init_args.check_unknown(kwargs)
    target = _resolve_address(address)
    init_args.warn_ignored({
        "local_mode": local_mode, "include_dashboard": include_dashboard,
        "dashboard_host": dashboard_host, "dashboard_port": dashboard_port,
        "job_config": job_config, "logging_config": logging_config,
        "enable_resource_isolation": enable_resource_isolation,
        "system_reserved_cpu": system_reserved_cpu,
        "system_reserved_memory": system_reserved_memory, **kwargs}, joining=target is not None)
    init_args.configure_logging(configure_logging, logging_level, logging_format)
    log_to_driver = True if log_to_driver is None else log_to_driver
    # Numbers first: a bad one is an error even when init() would do nothing.
    validation.check_quantity("init()", "num_cpus", num_cpus)
    validation.check_quantity("init()", "num_gpus", num_gpus)
    object_store_memory = validation.check_byte_count("init()", "object_store_memory",
                                                      object_store_memory)
    validation.check_resources("init()", resources)
    init_args.check_metrics_port(kwargs.get("_metrics_export_port"))
    with _state.lock:
        if _state.core is not None:
            if ignore_reinit_error:
                return _context_info()
            raise RuntimeError("Maybe you called meshray.init twice by accident? This error "
                               "can be suppressed by passing in 'ignore_reinit_error=True'.")
        if runtime_env is not None and not isinstance(runtime_env, dict):
            raise ValueError(f"init() argument runtime_env={runtime_env!r} must be a dict")
        from meshray.runtime_env import validate_runtime_env
        runtime_env = validate_runtime_env(runtime_env)
        from meshray.core import ray_alias
        if ray_alias.installed():   # `meshray run`: the job's workers resolve `ray` too
            runtime_env = ray_alias.with_alias_env(runtime_env)
        if namespace is not None and not isinstance(namespace, str):
            raise ValueError(f"init() argument namespace={namespace!r} must be a string")

        from meshray.node import launcher
        if target is not None:
            _check_join_arguments(num_cpus=num_cpus, num_gpus=num_gpus, resources=resources,
                                  object_store_memory=object_store_memory,
                                  _system_config=kwargs.get("_system_config"),
                                  _node_name=kwargs.get("_node_name"))
        from meshray import security
        token = (security.validate_token(kwargs["_token"], "init(_token=...)")
                 if kwargs.get("_token") else security.resolve_token())
        node = None
        if target is None:
            token = token or security.generate_token()
            node = launcher.start_node(
                embedded_etcd=True, num_cpus=num_cpus, num_gpus=num_gpus, resources=resources,
                labels=labels, object_store_memory=object_store_memory, token=token,
                lease_ttl=kwargs.get("_lease_ttl"), include_dashboard=include_dashboard is not False,
                metrics_export_port=kwargs.get("_metrics_export_port"))
            daemon_address = node.local_address
            cluster_address = node.etcd
        else:
            if target == "auto":
                record, refused = _find_local_node(None)
                if record is None:
                    raise ConnectionError(
                        "Could not find any running meshray instance on this machine. "
                        "Start one with `meshray start`, or call init() without an address."
                        + _set_aside(refused))
            else:
                record, refused = _find_local_node(target)
                _check_etcd_reachable(target, token or _read_token(record))
                if record is None:
                    raise ConnectionError(
                        f"No meshray node on this machine is joined to etcd at {target}; "
                        f"run `meshray start --address {target}` here first."
                        + _set_aside(refused))
            token = token or _read_token(record)
            _inherit_node_tls(record)
            daemon_address = record["local_address"]
            cluster_address = record.get("etcd", "") if target == "auto" else target
        job_id = ids.new_job_id()
        try:
            core = CoreWorker(daemon_address=daemon_address, token=token, role="driver",
                              job_id=job_id, namespace=namespace or "", log_to_driver=log_to_driver)
        except BaseException:
            if node is not None:
                node.stop()
            raise
        _state.core, _state.mode, _state.job_id = core, "driver", job_id
        _state.namespace = namespace or f"anonymous-{job_id.hex()}"
        _state.job_runtime_env = runtime_env or {}
        _state.local_node = node
        _state.cluster_address = cluster_address
        _name_job_driver(core)
        return _context_info()


def _name_job_driver(core) -> None:
    """A job's entrypoint (its supervisor set the submission id) names this driver
    in the job's record: Ray's JobDetails.job_id and driver_info. Best effort:
    a driver runs the same whether or not its job record could be changed."""
    submission_id = os.environ.get("MESHRAY_JOB_SUBMISSION_ID")
    if not submission_id:
        return
    try:
        core.request("job_driver", {"submission_id": submission_id}, timeout=10.0)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log.debug("job %s: driver not recorded: %s", submission_id, exc)


def _check_join_arguments(**given) -> None:
    """Ray's rule: what sizes a new cluster is an error when joining an existing one."""
    for name, value in given.items():
        if value is not None and value != {}:
            raise ValueError(f"When connecting to an existing cluster, {name} must not be "
                             f"provided (got {name}={value!r}); it sizes a cluster that init() "
                             f"starts, and the nodes of this one were sized by meshray start.")


def _set_aside(refused: list) -> str:
    return (" Node records that were not trusted, and so not used: " + "; ".join(refused)
            if refused else "")


def _read_token(record: dict | None) -> str | None:
    from meshray import security
    from meshray.common.private_files import read_file_in_private_dir
    if record is None:
        return None
    session_dir = record["session_dir"]
    try:
        data = read_file_in_private_dir(session_dir, "token", what="token file")
    except FileNotFoundError:
        return None
    try:
        return security.validate_token(data.decode("ascii").strip(),
                                       f"token file {os.path.join(session_dir, 'token')!r}")
    except UnicodeDecodeError:
        raise ValueError(f"token file {os.path.join(session_dir, 'token')!r} is not "
                         "ASCII text") from None


def _inherit_node_tls(record: dict) -> None:
    """Dial other nodes and actors with the TLS settings of the node we joined.

    The rpc factory reads MESHRAY_TLS_* by default, so exporting the node's
    settings here is all a driver needs; settings already in the
    environment win (the user chose them).
    """
    from meshray import security
    from meshray.rpc.tls import ENV_CA, ENV_CERT
    if os.environ.get(ENV_CERT) or os.environ.get(ENV_CA):
        return
    tls = security.load_session_tls(record.get("session_dir", ""))
    if tls is not None:
        os.environ.update(tls.to_env())


class InitContext(dict):
    """What init() returns: a dict, with Ray's RayContext attribute ``dashboard_url``."""

    @property
    def dashboard_url(self) -> str:
        return self["dashboard_url"]


def _context_info() -> InitContext:
    core = _state.core
    return InitContext(node_id=core.node_id.hex(), session_dir=core.session_dir,
                       address=core.node_address, job_id=_state.job_id.hex(),
                       dashboard_url=dashboard_url_of(core))


FLUSH_OUTPUT_TIMEOUT_S = 2.0


def _flush_output(core, mode) -> None:
    """A driver's last look at its node's worker output: lines its finished
    tasks printed (a progress bar's final state, say) that were still in a
    pipe arrive before the answer. Best effort: leaving is never held up long."""
    if mode != "driver" or core.lost:
        return
    try:
        core.request("flush_output", timeout=FLUSH_OUTPUT_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - the node may be gone or old: nothing more to show
        pass


def shutdown() -> None:
    """Disconnect, and stop the cluster this process started (if any)."""
    with _state.lock:
        core, node, mode = _state.core, _state.local_node, _state.mode
        _state.core = None
        _state.local_node = None
        _state.mode = None
        if core is not None:
            placement_groups = sys.modules.get("meshray.util.placement_group")
            if placement_groups is not None:
                placement_groups._flush()  # requests sent without waiting for the reply
            metrics = sys.modules.get("meshray.util.metrics")
            if metrics is not None:
                metrics._flush(core)       # what was recorded since the last report
            _flush_output(core, mode)
            core.close()
        if node is not None:
            node.stop()


atexit.register(shutdown)
# The first call that needs a cluster connects as a bare init() would (Ray's rule).
_state.auto_init = init


def remote(*args, **kwargs):
    """Make a function a remote function (or a class an actor class)."""
    if len(args) == 1 and not kwargs and callable(args[0]):
        return _make_remote(args[0], {})
    if args:
        raise TypeError("The @meshray.remote decorator must be applied either with no "
                        "arguments and no parentheses, or with keyword arguments only.")
    return lambda target: _make_remote(target, kwargs)


def _make_remote(target, options: dict):
    if inspect.isclass(target):
        return ActorClass(target, options)
    if not callable(target):
        raise TypeError(f"@meshray.remote must decorate a function or class, got {target!r}")
    return RemoteFunction(target, options)


def _as_ref_list(object_refs, what: str):
    if isinstance(object_refs, ObjectRef):
        return [object_refs], True
    if isinstance(object_refs, (list, tuple)):
        for item in object_refs:
            if not isinstance(item, ObjectRef):
                raise TypeError(f"{what} expected ObjectRefs in the list, got {type(item).__name__}")
        return list(object_refs), False
    if isinstance(object_refs, ObjectRefGenerator):
        raise TypeError(f"{what} got an ObjectRefGenerator; iterate it to get ObjectRefs")
    raise TypeError(f"{what} expected an ObjectRef or a list of ObjectRefs, "
                    f"got {type(object_refs).__name__}")


def get(object_refs, *, timeout: float | None = None):
    """Wait for and return the value(s) of ObjectRef(s)."""
    timeout = validation.check_timeout("get()", timeout)
    refs, single = _as_ref_list(object_refs, "get()")
    values = state_mod.ensure_core().get(refs, timeout)
    return values[0] if single else values


def put(value, *, _owner=None) -> ObjectRef:
    """Store a value in the object store and return its ObjectRef."""
    return state_mod.ensure_core().put(value)


def wait(ray_waitables, *, num_returns: int = 1, timeout: float | None = None,
         fetch_local: bool = True):
    """Return (ready, not_ready) once num_returns refs are ready or timeout passes.

    The list may hold ObjectRefGenerators too: one is ready when `next()` on
    it would return at once (its next item is ready, or it has no more).
    """
    if isinstance(ray_waitables, ObjectRef):
        raise TypeError("wait() expected a list of ObjectRef, got a single ObjectRef")
    if not isinstance(ray_waitables, (list, tuple)):
        raise TypeError(f"wait() expected a list of ObjectRef, got {type(ray_waitables).__name__}")
    generators = [item for item in ray_waitables if isinstance(item, ObjectRefGenerator)]
    refs, _ = _as_ref_list([item for item in ray_waitables
                            if not isinstance(item, ObjectRefGenerator)], "wait()")
    if generators:
        refs = list(ray_waitables)
    if len(set(refs)) != len(refs):
        raise ValueError("Wait requires a list of unique object refs.")
    if isinstance(num_returns, bool) or not isinstance(num_returns, int) or num_returns < 0:
        raise ValueError(f"wait() argument num_returns={num_returns!r} must be an int >= 0")
    timeout = validation.check_timeout("wait()", timeout)
    if not isinstance(fetch_local, bool):
        raise ValueError(f"wait() argument fetch_local={fetch_local!r} must be a bool")
    if not refs:
        return [], []       # as Ray: nothing to wait for, whatever num_returns says
    if num_returns > len(refs):
        raise ValueError(f"num_returns ({num_returns}) cannot be greater than the number "
                         f"of objects provided ({len(refs)}).")
    if generators:
        return state_mod.ensure_core().wait_generators(refs, num_returns, timeout, fetch_local)
    return state_mod.ensure_core().wait(refs, num_returns, timeout, fetch_local)


def cancel(ray_waitable, *, force: bool = False, recursive: bool = True) -> None:
    """Cancel the task that produces `ray_waitable` (an ObjectRef or ObjectRefGenerator)."""
    object_ref = ray_waitable
    if isinstance(object_ref, ObjectRefGenerator):
        object_ref = object_ref.completed()
    if not isinstance(object_ref, ObjectRef):
        raise TypeError(f"cancel() argument ray_waitable must be an ObjectRef or "
                        f"ObjectRefGenerator, got {type(object_ref).__name__}")
    state_mod.ensure_core().cancel(object_ref, force, recursive)


def cluster_resources() -> dict:
    return state_mod.ensure_core().request("cluster_resources")


def available_resources() -> dict:
    core = state_mod.ensure_core()
    # An idle worker lease holds resources nothing uses: given back first (its
    # return reaches the node before this question does).
    core.leases.release_idle()
    return core.request("available_resources")


def nodes() -> list:
    return state_mod.ensure_core().request("nodes")


def get_gpu_ids() -> list:
    """GPU ids assigned to the current task or actor (empty in a driver)."""
    return [int(i) if str(i).isdigit() else i
            for i in get_runtime_context().get_accelerator_ids().get("GPU", [])]


def kill(actor, *, no_restart: bool = True) -> None:
    """Kill an actor now (running and queued calls fail with ActorDiedError)."""
    if not isinstance(actor, ActorHandle):
        raise ValueError(f"kill() expected an actor handle, got {type(actor).__name__}")
    if not isinstance(no_restart, bool):
        raise ValueError(f"kill() argument no_restart={no_restart!r} must be a bool")
    state_mod.ensure_core().request("kill_actor", {"actor_id": actor._actor_id.hex(),
                                          "no_restart": no_restart})


