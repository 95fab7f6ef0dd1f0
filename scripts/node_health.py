#!/usr/bin/env python3
"""Container health check: exit 0 when this machine's meshray node serves.

"Serves" means more than "the process exists": the check makes an
authenticated GetNodeInfo call to the node's gRPC address (the one its
record advertises), so a daemon that is wedged, or whose token gate rejects
its own token, is reported unhealthy. It reads the token from the node's 0600 session file, so it
must run as the user that started the node (the image's `meshray` user).
"""
from __future__ import annotations

import os
import sys

__all__ = ["check"]


def check(timeout: float = 3.0) -> str:
    """Return the node id of a serving local node, or raise with the reason."""
    from meshray import security
    from meshray.node import registry
    from meshray.rpc.factory import make_channel
    from meshray.rpc.generated import meshray_pb2 as pb
    from meshray.rpc.generated import meshray_pb2_grpc as pb_grpc

    records = [r for r in registry.read_records() if r.get("cli")] or registry.read_records()
    if not records:
        raise RuntimeError(f"no meshray node is registered in {registry.run_dir()}")
    errors = []
    for record in records:
        token_path = os.path.join(record.get("session_dir", ""), "token")
        try:
            token = security.read_token_file(token_path)
            with make_channel(record["address"], token=token) as channel:
                reply = pb_grpc.NodeServiceStub(channel).GetNodeInfo(pb.NodeInfoRequest(),
                                                                     timeout=timeout)
            return reply.node_id.hex()
        except Exception as exc:  # noqa: BLE001 - report every node's reason
            errors.append(f"node {record.get('node_id', '?')[:12]}: {exc}")
    raise RuntimeError("; ".join(errors))


def main() -> int:
    try:
        node = check()
    except Exception as exc:  # noqa: BLE001
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    print(f"healthy: node {node}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
