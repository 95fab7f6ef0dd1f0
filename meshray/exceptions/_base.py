"""The base of every meshray/Ray error, how errors pickle, and the id helpers
every error message uses (the public names live in meshray.exceptions)."""
from __future__ import annotations

import numbers
import pickle
import socket
import threading
from typing import Any, Optional

import cloudpickle as _pickler   # exception classes defined in __main__ or locally pickle too

def _hex(value: Any) -> Optional[str]:
    """Render an id (bytes, str, or an object with .hex()) as a hex string."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    hexer = getattr(value, "hex", None)
    if callable(hexer) and not isinstance(value, numbers.Number):
        try:
            out = hexer()
            if isinstance(out, str):
                return out
        except TypeError:
            pass
    return str(value)


_IP_LOCK = threading.Lock()
_IP: Optional[str] = None


def _local_ip() -> str:
    # A UDP connect sends no packet; it only asks the kernel for the source
    # address it would route from. Cached: this runs on every task failure.
    global _IP
    if _IP is not None:
        return _IP
    with _IP_LOCK:
        if _IP is None:
            _IP = "127.0.0.1"
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.connect(("10.255.255.255", 1))
                    _IP = s.getsockname()[0]
            except OSError:
                pass
    return _IP


def _ids(**ids: Any) -> str:
    """' (k=v, ...)' for the ids that are set, so messages name what they know."""
    parts = [f"{k}={v}" for k, v in ids.items() if v]
    return f" ({', '.join(parts)})" if parts else ""


def _rebuild_error(cls, args, state):
    # Rebuild without __init__: constructors differ, the state is what matters.
    try:
        obj = cls.__new__(cls, *args)
    except TypeError:
        obj = BaseException.__new__(cls)
    obj.args = args
    if state:
        obj.__dict__.update(state)
    return obj


class RayError(Exception):
    """Base of every meshray/Ray error."""

    def __reduce__(self):
        return (_rebuild_error, (type(self), self.args, dict(self.__dict__)))

    def to_bytes(self) -> bytes:
        """Serialize for the wire (cloudpickle, so locally defined causes survive)."""
        return _pickler.dumps(self)

    @staticmethod
    def from_bytes(data: bytes) -> "RayError":
        try:
            return pickle.loads(data)
        except Exception as e:  # noqa: BLE001 - report any decoding failure uniformly
            raise RuntimeError("Failed to unpickle serialized exception") from e


class CrossLanguageError(RayError):
    """Raised from another language's worker (kept for Ray API parity)."""

    def __init__(self, message: Any, language: str = "UNKNOWN"):
        self.language = language
        super().__init__(f"An exception raised from {language}:\n{message}")


class TaskCancelledError(RayError):
    """The task (or one it depended on) was cancelled."""

    def __init__(self, task_id: Any = None, error_message: Optional[str] = None):
        self.task_id = _hex(task_id)
        self.error_message = error_message
        super().__init__(self.task_id, error_message)

    def __str__(self) -> str:
        msg = ""
        if self.task_id is not None:
            msg = f"Task: {self.task_id} was cancelled. "
        if self.error_message:
            msg += self.error_message
        return msg or "This task or its dependency was cancelled."
