"""gRPC plumbing: the one factory for channels and servers, and generated code."""
from meshray.rpc.factory import (
    accept_targets,
    is_loopback_host,
    join_host_port,
    make_aio_channel,
    make_aio_server,
    make_channel,
    make_server,
    split_host_port,
)

__all__ = [
    "accept_targets",
    "is_loopback_host",
    "join_host_port",
    "make_aio_channel",
    "make_aio_server",
    "make_channel",
    "make_server",
    "split_host_port",
]
