"""`meshray metrics sd-file PATH`: Prometheus file_sd targets of the live nodes.

For a Prometheus that cannot reach a node's `/sd` endpoint (or prefers
files): the targets come from the cluster's etcd view, as `meshray.nodes()`
returns it, and the file is replaced atomically, so Prometheus never reads
half of it. With --interval the file is rewritten until interrupted.
"""
from __future__ import annotations

import json
import sys
import time

__all__ = ["add_parser", "write_sd_file"]


def write_sd_file(path: str, nodes: list) -> int:
    """Write file_sd JSON for the alive `nodes`; returns how many targets it lists."""
    from meshray.node.metrics import sd_targets
    from meshray.security import write_private_file

    groups = sd_targets({node["NodeID"]: node for node in nodes if node.get("Alive")})
    # Public (0644): Prometheus may run as another user; it holds no secret.
    write_private_file(path, json.dumps(groups, indent=1), mode=0o644)
    return len(groups)


def _cmd_sd_file(args) -> int:
    if args.interval is not None and args.interval <= 0:
        raise ValueError(f"--interval={args.interval!r}: expected a positive number of seconds")
    import meshray
    meshray.init(address=args.address or "auto", log_to_driver=False)
    try:
        while True:
            count = write_sd_file(args.path, meshray.nodes())
            print(f"wrote {count} target(s) to {args.path}", file=sys.stderr)
            if args.interval is None:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
    finally:
        meshray.shutdown()


def add_parser(subparsers) -> None:
    """Register `metrics sd-file` on the `meshray` command's subparsers."""
    metrics = subparsers.add_parser("metrics", help="Prometheus helpers").add_subparsers(
        dest="metrics_command", required=True)
    sd_file = metrics.add_parser("sd-file", help="write Prometheus file_sd targets of every "
                                 "live node's metrics endpoint", description=__doc__)
    sd_file.add_argument("path", help="JSON file to write (replaced atomically)")
    sd_file.add_argument("--address", help="cluster to attach to (default: auto)")
    sd_file.add_argument("--interval", type=float,
                         help="rewrite every INTERVAL seconds until interrupted")
    sd_file.set_defaults(func=_cmd_sd_file)
