"""Ending a gRPC stream without leaving its finalizer to the interpreter's exit.

A synchronous gRPC stream's error *is* the stream (the call object raises
itself), and the error's traceback holds the frames that iterated it --
which hold the stream. That cycle is freed only by the cyclic collector,
whenever it next runs; if that is during interpreter exit, the stream's
finalizer takes the stream's lock, which a daemon thread stopped by the
exit (gRPC's polling thread, a reader) may hold for ever: the process has
done its work and never exits. Forgetting the traceback once the error has
been handled breaks the cycle, so the stream is freed as soon as its last
reference goes, while those threads still run.
"""
from __future__ import annotations

__all__ = ["release_stream_error"]


def release_stream_error(exc: BaseException | None) -> None:
    """Drop `exc`'s traceback (call once it has been logged or inspected)."""
    if exc is not None:
        exc.__traceback__ = None
