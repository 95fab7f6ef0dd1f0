"""`meshray start | stop | status | list | get | summary | timeline | logs | run | metrics |
etcd-credentials | health-check | microbenchmark | chaos`."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

__all__ = ["build_parser", "main"]


def _cmd_start(args) -> int:
    from meshray.node import launcher, registry

    resources = json.loads(args.resources) if args.resources else {}
    if not isinstance(resources, dict):
        print(f"--resources must be a JSON object, got {args.resources!r}", file=sys.stderr)
        return 2
    from meshray import security
    from meshray.rpc.tls import TlsConfig
    embedded = not args.address
    try:
        token = security.resolve_token(args.token, args.token_file)
        if embedded and not token:
            token = security.generate_token()
        etcd_options = security.etcd_client_options(
            ca_cert=args.etcd_ca, cert_cert=args.etcd_cert, cert_key=args.etcd_key,
            user=args.etcd_user, password_file=args.etcd_password_file, token=token)
        tls = (TlsConfig(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca,
                         client_auth=args.tls_client_auth,
                         server_name=args.tls_server_name)
               if (args.tls_cert or args.tls_key or args.tls_ca) else TlsConfig.from_env())
        from meshray.node.drain import drain_timeout
        drain_timeout(args.drain_timeout)
        if args.memory is not None and args.memory <= 0:
            raise ValueError(f"--memory={args.memory}: expected a number of bytes > 0")
    except (ValueError, TypeError) as exc:
        print(f"meshray start: {exc}", file=sys.stderr)
        return 2
    if embedded:
        error = _unsafe_etcd_error(args.allow_unsafe_etcd)
        if error:
            print(f"meshray start: {error}", file=sys.stderr)
            return 2
    address = args.address[len("etcd://"):] if args.address and args.address.startswith(
        "etcd://") else args.address
    node = launcher.start_node(
        etcd=address, embedded_etcd=embedded, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
        resources=resources, labels=json.loads(args.labels) if args.labels else None,
        object_store_memory=args.object_store_memory, host=args.host, port=args.port,
        token=token, session_dir=None, tie_to_parent=False, cli=True,
        lease_ttl=args.lease_ttl, tls=tls, etcd_options=etcd_options, advertise_host=args.advertise_host,
        metrics_export_port=args.metrics_export_port, dashboard_port=args.dashboard_port,
        data_port=args.data_port, memory=args.memory, drain_timeout=args.drain_timeout)
    node.owns_session_dir = False  # the daemon removes its own session dir on exit
    token_path = os.path.join(node.session_dir, "token")
    print(f"meshray node {node.node_id} started (pid {node.pid})")
    print(f"  node address : {node.address}")
    print(f"  etcd         : {node.etcd}")
    print(f"  metrics      : http://{args.host}:{node.info.get('metrics_export_port')}/metrics")
    print(f"  dashboard    : {node.info.get('dashboard_scheme', 'http')}://{args.host}:"
          f"{node.info.get('dashboard_port')}/ (log in with the cluster token; also the jobs API)")
    if embedded:
        print(f"  cluster token: written to {token_path} (mode 0600)")
        print(security.join_hint(node.etcd, token_path))
    print("To connect a driver on this machine: meshray.init(address='auto')")
    if args.block:
        def forward(signum, _frame):
            node.process.send_signal(signum)
        signal.signal(signal.SIGINT, forward)
        signal.signal(signal.SIGTERM, forward)
        code = node.process.wait()
        # The daemon's own status (0 after a drain); 128+N when a signal killed it.
        return code if code >= 0 else 128 - code
    del registry
    return 0


def _unsafe_etcd_error(allow_unsafe: bool) -> str | None:
    """Why this node's embedded etcd must not start, checked before the daemon
    starts so the operator sees etcd's release and what to do about it."""
    from meshray.coordination import etcd_release
    if allow_unsafe:
        os.environ[etcd_release.ALLOW_UNSAFE_ENV] = "1"   # the daemon inherits it
    try:
        binary = etcd_release.find_etcd_binary()
        etcd_release.check_release(binary, etcd_release.etcd_version(binary), persistent=True)
    except RuntimeError as exc:
        return str(exc)
    return None


def _cmd_stop(args) -> int:
    """Stop the daemons `meshray start` left running, by their verified records.

    A pid is signalled only while it is still the daemon its record names
    (see registry.daemon_process); anything else in the run dir is reported
    and left alone, and the exit status says so.
    """
    import psutil

    from meshray.node import registry
    from meshray.common.private_files import UnsafePathError

    try:
        scan = registry.scan_records()
    except UnsafePathError as exc:
        print(f"meshray stop: {exc}", file=sys.stderr)
        return 1
    for message in scan.stale:
        print(f"removed stale record: {message}")
    for message in scan.refused:
        print(f"meshray stop: skipped {message}", file=sys.stderr)
    targets = []
    for record in scan.records:
        if not record.get("cli"):
            continue
        process, why = registry.daemon_process(record)
        if process is None:
            print(f"meshray stop: skipped node {record['node_id']}: {why}", file=sys.stderr)
            continue
        try:
            process.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
        targets.append((record, process))
    if not targets and not scan.refused:
        print("no meshray nodes started by `meshray start` are running on this machine")
    deadline = time.monotonic() + args.grace_period
    failed = bool(scan.refused)
    for record, process in targets:
        if not _exited(process, deadline):
            try:
                process.send_signal(signal.SIGKILL)   # psutil re-checks it is the same process
            except psutil.NoSuchProcess:
                pass
            if not _exited(process, time.monotonic() + 10):
                print(f"meshray stop: node {record['node_id']} (pid {process.pid}) did not exit "
                      "after SIGKILL", file=sys.stderr)
                failed = True
                continue
        registry.remove_record(record["node_id"])
        print(f"stopped meshray node {record['node_id']} (pid {process.pid})")
    return 1 if failed else 0


def _exited(process, deadline: float) -> bool:
    """Wait until `process` is gone (or a zombie: exited, not yet reaped by its parent)."""
    import psutil

    while True:
        try:
            # is_running() compares start times: a reused pid counts as gone.
            if not process.is_running() or process.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _connect(address):
    import meshray
    meshray.init(address=address or "auto", log_to_driver=False)
    return meshray


def _cmd_status(args) -> int:
    meshray = _connect(args.address)
    try:
        from meshray.core.state import state
        nodes = meshray.nodes()
        usage = state.core.request("node_usage")
        print(f"{'node':<34} {'state':<6} {'address':<22} resources (available / total)")
        for node in sorted(nodes, key=lambda n: (not n["Alive"], n["NodeID"])):
            total = node.get("Resources", {})
            free = usage.get(node["NodeID"], {}) if node["Alive"] else {}
            parts = [f"{k} {free.get(k, 0):g}/{v:g}" for k, v in sorted(total.items())
                     if not k.startswith("node:") and k not in ("memory", "object_store_memory")]
            print(f"{node['NodeID']:<34} {'alive' if node['Alive'] else 'DEAD':<6} "
                  f"{node.get('Address', node.get('NodeManagerAddress', '')):<22} "
                  + ", ".join(parts))
            if node["Alive"] and node.get("DashboardPort"):
                host = node.get("Address", node.get("NodeManagerAddress", "")).rsplit(":", 1)[0]
                print(f"{'':<34} dashboard and jobs API: http://{host}:{node['DashboardPort']}/")
            labels = node.get("Labels") or {}
            if labels:
                print(f"{'':<34} labels: {labels}")
        print("cluster total    :", meshray.cluster_resources())
        print("cluster available:", meshray.available_resources())
    finally:
        meshray.shutdown()
    return 0


def _cmd_dump_events(args) -> int:
    """Write the event log of the node this command attaches to, as JSON lines."""
    if args.last is not None and args.last < 0:
        print(f"meshray debug dump-events: --last={args.last} must be >= 0", file=sys.stderr)
        return 2
    meshray = _connect(args.address)
    try:
        from meshray.core.state import state
        dump = state.core.request("dump_events", {} if args.last is None else {"last": args.last})
    finally:
        meshray.shutdown()
    lines = [json.dumps(event, sort_keys=True) for event in dump["events"]]
    text = "\n".join(lines) + ("\n" if lines else "")
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(text)
    else:
        sys.stdout.write(text)
    print(f"node {dump['node_id']}: {len(lines)} event(s) written "
          f"({dump['recorded']} recorded, the last {dump['capacity']} kept)", file=sys.stderr)
    return 0


def _cmd_run(args) -> int:
    from meshray.run import run_script
    return run_script(args.script, args.args)


def _cmd_etcd_credentials(args) -> int:
    """Print the etcd login a cluster's members derive from its token, so an
    operator can create that user in an etcd they run themselves."""
    from meshray import security
    try:
        token = security.resolve_token(args.token, args.token_file)
    except (ValueError, TypeError) as exc:
        print(f"meshray etcd-credentials: {exc}", file=sys.stderr)
        return 2
    if token is None:
        print("meshray etcd-credentials: no cluster token: pass --token-file (or set "
              "MESHRAY_TOKEN / MESHRAY_TOKEN_FILE)", file=sys.stderr)
        return 2
    password = security.etcd_password(token)
    if args.enable_auth:
        return _enable_etcd_auth(args.enable_auth, args.user, password, args.timeout)
    if args.password_only:
        print(password)
    else:
        print(f"user: {args.user}")
        print(f"password: {password}")
    return 0


def _enable_etcd_auth(endpoints: str, user: str, password: str, timeout: float) -> int:
    """Create `user` (role root) with the derived password on an etcd the
    operator runs and turn auth on; idempotent, retried until `timeout`
    while the members come up (a Kubernetes Job runs it, docs/kubernetes.md)."""
    from meshray.coordination.etcd_auth import EtcdAuthError, enable_root_auth, gateway_request
    members = [e.strip() for e in endpoints.split(",") if e.strip()]
    if not members:
        print(f"meshray etcd-credentials: --enable-auth={endpoints!r}: expected "
              "HOST:PORT[,HOST:PORT]", file=sys.stderr)
        return 2
    deadline = time.monotonic() + timeout
    attempt = 0
    while True:
        endpoint = members[attempt % len(members)]
        attempt += 1
        try:
            request = gateway_request(endpoint, timeout=min(10.0, max(1.0, timeout)))
            turned_on = enable_root_auth(request, user, password, endpoint)
        except ValueError as exc:
            print(f"meshray etcd-credentials: {exc}", file=sys.stderr)
            return 2
        except EtcdAuthError as exc:
            if not exc.retryable:
                print(f"meshray etcd-credentials: {exc}", file=sys.stderr)
                return 1
            error = str(exc)
        except OSError as exc:
            error = f"cannot reach etcd at {endpoint}: {exc}"
        else:
            print(f"etcd auth {'enabled' if turned_on else 'already enabled'} for user "
                  f"{user!r} at {endpoint}")
            return 0
        if time.monotonic() >= deadline:
            print(f"meshray etcd-credentials: gave up after {timeout:g}s: {error}",
                  file=sys.stderr)
            return 1
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))


def _cmd_chaos(chaos_argv: list[str]) -> int:
    """`meshray chaos ...`: the chaos harness's own command line, installed with meshray."""
    try:
        from chaos.cli import main as chaos_main
    except ImportError as exc:
        print(f"meshray chaos: the chaos harness is not importable ({exc}); it ships in the "
              "meshray package as the top-level `chaos` package", file=sys.stderr)
        return 2
    return chaos_main(chaos_argv, prog="meshray chaos")


def build_parser() -> argparse.ArgumentParser:
    """The `meshray` command line (tests parse the Kubernetes manifests' with it)."""
    parser = argparse.ArgumentParser(prog="meshray", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    start = commands.add_parser("start", help="start a node daemon on this machine")
    start.add_argument("--address", help="etcd endpoint(s) to join, HOST:PORT[,HOST:PORT]")
    start.add_argument("--num-cpus", type=float)
    start.add_argument("--num-gpus", type=float)
    start.add_argument("--resources", default="", help='JSON, e.g. \'{"custom": 2}\'')
    start.add_argument("--labels", default="", help="JSON object of node labels")
    start.add_argument("--object-store-memory", type=int)
    start.add_argument("--memory", type=int, default=None,
                       help="bytes of memory tasks may reserve (Ray's `memory` resource; "
                            "default: 70%% of this machine's memory)")
    start.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    start.add_argument("--port", type=int, default=0)
    start.add_argument("--advertise-host", default="",
                       help="address peers dial (default: --host, or this machine's address "
                            "when binding 0.0.0.0)")
    start.add_argument("--token", help="cluster token (or MESHRAY_TOKEN)")
    start.add_argument("--token-file", help="file holding the cluster token "
                       "(or MESHRAY_TOKEN_FILE)")
    start.add_argument("--tls-cert", help="PEM certificate chain for gRPC TLS "
                       "(or MESHRAY_TLS_CERT)")
    start.add_argument("--tls-key", help="PEM private key (or MESHRAY_TLS_KEY)")
    start.add_argument("--tls-ca", help="CA bundle peers must chain to (or MESHRAY_TLS_CA)")
    start.add_argument("--tls-client-auth", action="store_true",
                       help="require client certificates (mutual TLS)")
    start.add_argument("--tls-server-name", help="name expected in peers' certificates "
                       "(or MESHRAY_TLS_SERVER_NAME)")
    start.add_argument("--etcd-ca", help="CA for etcd's TLS (or MESHRAY_ETCD_CA)")
    start.add_argument("--etcd-cert", help="etcd client certificate (or MESHRAY_ETCD_CERT)")
    start.add_argument("--etcd-key", help="etcd client key (or MESHRAY_ETCD_KEY)")
    start.add_argument("--etcd-user", help="etcd user (or MESHRAY_ETCD_USER)")
    start.add_argument("--etcd-password-file", help="file holding the etcd password "
                       "(or MESHRAY_ETCD_PASSWORD[_FILE])")
    start.add_argument("--lease-ttl", type=float)
    from meshray.node.drain import DRAIN_TIMEOUT_HELP
    start.add_argument("--drain-timeout", type=float, default=None, help=DRAIN_TIMEOUT_HELP)
    start.add_argument("--metrics-export-port", type=int, default=None,
                       help="port of the node's Prometheus endpoint, on --host (default: a "
                            "free port; meshray.nodes() shows it as MetricsExportPort)")
    start.add_argument("--dashboard-port", type=int, default=None,
                       help="port of the node's HTTP API (jobs), on --host (default: 8265, or "
                            "a free port when taken; meshray status shows it)")
    start.add_argument("--data-port", type=int, default=None,
                       help="port of the node's data link, on --host: large objects' bytes "
                            "between nodes (default: a free port; meshray.nodes() shows it as "
                            "DataPort). Open it between nodes beside --port")
    start.add_argument("--allow-unsafe-etcd", action="store_true",
                       help="run the embedded etcd even if its release is known to lose data "
                            "after a crash (or MESHRAY_ALLOW_UNSAFE_ETCD=1)")
    start.add_argument("--block", action="store_true", help="stay in the foreground")
    start.set_defaults(func=_cmd_start)

    stop = commands.add_parser("stop", help="stop the nodes `meshray start` started here")
    stop.add_argument("--grace-period", type=float, default=30.0,
                      help="seconds a node may drain before it is killed (default 30: "
                           "above the nodes' default 25 s drain)")
    stop.set_defaults(func=_cmd_stop)

    status = commands.add_parser("status", help="show nodes and resources")
    status.add_argument("--address")
    status.set_defaults(func=_cmd_status)

    from meshray.cli import state as state_cli
    state_cli.add_parsers(commands)

    debug = commands.add_parser("debug", help="debugging aids").add_subparsers(
        dest="debug_command", required=True)
    dump = debug.add_parser("dump-events", help="write a node's recent lifecycle events "
                            "(JSON lines: time, kind, id, from, to, cause)")
    dump.add_argument("--address", help="cluster to attach to (default: auto)")
    dump.add_argument("--last", type=int, help="only the last N events")
    dump.add_argument("--output", "-o", help="file to write (default: stdout)")
    dump.set_defaults(func=_cmd_dump_events)

    run = commands.add_parser(
        "run", help="run an unmodified Ray Core script: `import ray` gives meshray",
        description="Run SCRIPT with ARGS as `python SCRIPT ARGS` would, with `import ray` "
                    "(and ray.util, ray.exceptions, ...) resolving to meshray in the script "
                    "and in the workers of its jobs. Ray libraries meshray does not provide "
                    "(ray.data, ray.tune, ...) fail to import with an error naming them.")
    run.add_argument("script", help="path of the Python script")
    run.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    run.set_defaults(func=_cmd_run)

    credentials = commands.add_parser(
        "etcd-credentials",
        help="print the etcd user and password members derive from the cluster token",
        description="Members holding the cluster token log in to etcd as user 'root' (or "
                    "MESHRAY_ETCD_USER) with a password derived from the token. Create that "
                    "user in an etcd you run yourself and nodes need nothing else.")
    credentials.add_argument("--token-file", help="file holding the cluster token "
                             "(or MESHRAY_TOKEN_FILE)")
    credentials.add_argument("--token", help="cluster token (or MESHRAY_TOKEN)")
    credentials.add_argument("--user", default=os.environ.get("MESHRAY_ETCD_USER") or "root",
                             help="user name to print (default: MESHRAY_ETCD_USER or root)")
    credentials.add_argument("--password-only", action="store_true",
                             help="print just the password (for scripts)")
    credentials.add_argument("--enable-auth", metavar="HOST:PORT[,HOST:PORT]",
                             help="instead of printing: create the user (role root) on the "
                                  "etcd at these endpoints (plain HTTP) and turn auth on; "
                                  "does nothing when the login already works")
    credentials.add_argument("--timeout", type=float, default=120.0,
                             help="with --enable-auth: seconds to keep trying while etcd "
                                  "comes up (default 120)")
    credentials.set_defaults(func=_cmd_etcd_credentials)

    from meshray.cli import logs, microbenchmark
    microbenchmark.add_parser(commands)
    logs.add_parser(commands)

    from meshray.cli import metrics as metrics_cli
    metrics_cli.add_parser(commands)

    from meshray.cli import health as health_cli
    health_cli.add_parser(commands)

    from meshray.cli import jobs as jobs_cli
    jobs_cli.add_parser(commands)

    from meshray.scale import scale_test
    scale_test.add_parser(commands)

    chaos = commands.add_parser(
        "chaos", help="run workloads under injected faults and check the outcome",
        description="`meshray chaos list` shows the nemeses, workloads and checkers; "
                    "`meshray chaos run ...` attacks a local cluster it starts, or an existing "
                    "one with --address (see `meshray chaos run --help`).")
    chaos.add_argument("chaos_args", nargs=argparse.REMAINDER)
    chaos.set_defaults(func=lambda args: _cmd_chaos(args.chaos_args))

    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["chaos"]:       # everything after `chaos` is the harness's to parse
        return _cmd_chaos(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:       # a bad filter, id or option value: say which, no trace
        parser.exit(2, f"meshray: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
