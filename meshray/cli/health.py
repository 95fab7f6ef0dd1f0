"""`meshray health-check`: exit 0 when a node's health endpoint says success.

Ray's `ray health-check` asks the GCS; a meshray node answers for itself on
its HTTP port (node/health.py): readiness (`/api/healthz`), liveness
(`/api/local_raylet_healthz`) or its etcd membership (`/api/gcs_healthz`).
No token is sent or needed. Without --address it asks the node that
`meshray start` runs on this machine (its record in the run dir).
"""
from __future__ import annotations

import json
import ssl
import sys
import urllib.error
import urllib.request

__all__ = ["add_parser", "check"]

PATHS = {"readiness": "/api/healthz", "liveness": "/api/local_raylet_healthz",
         "etcd": "/api/gcs_healthz"}


def _local_url() -> str:
    from meshray.node import registry
    records = [r for r in registry.read_records() if r.get("cli")] or registry.read_records()
    if not records:
        raise RuntimeError(f"no meshray node is registered in {registry.run_dir()}; "
                           "pass --address http(s)://HOST:PORT")
    record = records[0]
    host = str(record.get("address", "127.0.0.1")).rsplit(":", 1)[0] or "127.0.0.1"
    return f"{record.get('dashboard_scheme', 'http')}://{host}:{record['dashboard_port']}"


def check(base_url: str, component: str = "readiness", timeout: float = 5.0) -> tuple[bool, str]:
    """(healthy, what the node said) for one component of the node at `base_url`."""
    if component not in PATHS:
        raise ValueError(f"component={component!r}: expected one of {sorted(PATHS)}")
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"--address={base_url!r}: expected http(s)://HOST:PORT")
    # The answer is ok/not-ok and nothing is sent: a node's self-signed
    # certificate is not worth refusing the probe for.
    context = ssl._create_unverified_context() if base_url.startswith("https://") else None
    url = base_url.rstrip("/") + PATHS[component]
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as answer:
            status, body = answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except (OSError, ValueError) as exc:
        return False, f"{url}: {exc}"
    try:
        said = json.loads(body)
    except ValueError:
        said = {}
    if status == 200 and said.get("status") == "success":
        return True, f"{url}: success"
    return False, f"{url}: HTTP {status}: {said.get('reason') or 'failed'}"


def _cmd_health_check(args) -> int:
    try:
        ok, said = check(args.address or _local_url(), args.component, args.timeout)
    except (RuntimeError, ValueError) as exc:
        print(f"meshray health-check: {exc}", file=sys.stderr)
        return 2
    print(said, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("health-check", help="exit 0 when a node is healthy",
                                   description=__doc__)
    parser.add_argument("--address", help="http(s)://HOST:PORT of a node's HTTP port "
                        "(default: the `meshray start` node on this machine)")
    parser.add_argument("--component", choices=sorted(PATHS), default="readiness",
                        help="what to check (default: readiness)")
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.set_defaults(func=_cmd_health_check)
