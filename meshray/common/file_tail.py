"""The end of a file, for error messages and reports that quote a process's output."""
from __future__ import annotations

import os

__all__ = ["read_tail"]


def read_tail(path: str, max_bytes: int) -> str:
    """The last `max_bytes` bytes of `path` as text ("" when it cannot be read).

    Only the end is read, so a huge log costs nothing; bytes that do not
    decode (a cut character, binary output) are replaced, never an error."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - max_bytes))
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
