"""RayTaskError: an exception raised by a task, carried to its caller.

It keeps the remote traceback (with meshray's own frames hidden) and the
cause, and becomes an instance of the cause's class too when raised on the
caller's side (`as_instanceof_cause`), so `except ValueError` catches a
ValueError a task raised. Causes that do not pickle travel as portable
stand-ins rather than failing the task's result.
"""
from __future__ import annotations

import logging
import os
import threading
import traceback
import weakref
from typing import Any, Optional

import cloudpickle as _pickler   # exception classes defined in __main__ or locally pickle too

from meshray.exceptions._base import RayError, _hex, _ids, _local_ip, _rebuild_error

logger = logging.getLogger(__name__)


# Frames from these meshray-internal paths are hidden from remote tracebacks:
# they are the same in every failure and only bury the user's frames.
_INTERNAL_FRAME_MARKERS = (
    f"{os.sep}meshray{os.sep}core{os.sep}",
    f"{os.sep}meshray{os.sep}node{os.sep}",
    f"{os.sep}meshray{os.sep}rpc{os.sep}",
)

_DUAL_CLASSES: "weakref.WeakKeyDictionary[type, type]" = weakref.WeakKeyDictionary()
_DUAL_LOCK = threading.Lock()


class _PortableException:
    """Pickles an exception without calling its __init__ on the way back.

    BaseException's default reduce re-calls `cls(*args)`, which breaks for
    user exceptions whose __init__ takes other arguments than it passes to
    super() - common in real code. Rebuilding from __new__ + state works for
    any class with the normal exception layout.
    """

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException):
        self.exc = exc

    def __reduce__(self):
        e = self.exc
        return (_rebuild_error, (type(e), e.args, dict(getattr(e, "__dict__", {}))))


def _portable(cause: Any) -> Any:
    # Only wrap classes that rely on BaseException's reduce; anything with
    # its own (RayError, OSError, user-defined) knows how to rebuild itself.
    if isinstance(cause, BaseException) and type(cause).__reduce__ is BaseException.__reduce__:
        return _PortableException(cause)
    return cause


def _serializable_cause(cause: Any) -> Any:
    if cause is None:
        return None
    try:
        _pickler.dumps(_portable(cause))
        return cause
    except Exception as e:  # noqa: BLE001 - any pickling failure means "can't ship it"
        try:
            text = str(cause)
        except Exception:  # noqa: BLE001 - a broken __str__ must not hide the error
            text = "<str() failed>"
        msg = (
            f"The original cause of the RayTaskError ({type(cause)}: {text}) isn't "
            f"serializable: {e}. Overwriting the cause to a RayError."
        )
        logger.warning(msg)
        return RayError(msg)


class RayTaskError(RayError):
    """A task raised; carries the remote traceback and the original exception.

    `ray.get` raises `as_instanceof_cause()`, which is an instance of both
    RayTaskError and the user's exception class, so `except ValueError` and
    `except RayTaskError` both catch it.
    """

    def __init__(
        self, function_name: str, traceback_str: Optional[str], cause: Any,
        proctitle: Optional[str] = None, pid: Optional[int] = None, ip: Optional[str] = None,
        actor_repr: Optional[str] = None, actor_id: Any = None, *,
        task_id: Any = None, node_id: Any = None,
    ):
        self.function_name = function_name
        self.traceback_str = traceback_str if traceback_str is not None else ""
        self.cause = _serializable_cause(cause)
        self.proctitle = proctitle or f"meshray::{function_name}"
        self.pid = pid or os.getpid()
        self.ip = ip or _local_ip()
        self.actor_repr = actor_repr
        self._actor_id = _hex(actor_id)
        self.task_id = _hex(task_id)
        self.node_id = _hex(node_id)
        super().__init__(function_name, self.traceback_str, self.cause, proctitle, pid, ip)

    @property
    def actor_id(self) -> Optional[str]:
        return self._actor_id

    def __reduce__(self):
        state = dict(self.__dict__)
        state["cause"] = _portable(state.get("cause"))
        args = tuple(_portable(a) for a in self.args)
        return (_rebuild_error, (type(self), args, state))

    @classmethod
    def from_exception(
        cls, exc: BaseException, function_name: str, *, task_id: Any = None, actor_id: Any = None,
        actor_repr: Optional[str] = None, node_id: Any = None, proctitle: Optional[str] = None,
    ) -> "RayTaskError":
        """Wrap an exception caught while running a task (keeps its chained causes)."""
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return cls(function_name, tb, exc, proctitle=proctitle, actor_repr=actor_repr,
                   actor_id=actor_id, task_id=task_id, node_id=node_id)

    def _root_cause(self) -> Any:
        cause = self.cause
        seen = 0
        while isinstance(cause, RayTaskError) and seen < 100:
            cause = cause.cause
            seen += 1
        return cause

    def make_dual_exception_type(self) -> type:
        """The class deriving from RayTaskError and the (innermost) cause's class.

        Raises TypeError when the cause's class refuses to be subclassed
        (an __init_subclass__ hook, a metaclass conflict).
        """
        cause_cls = type(self._root_cause())
        with _DUAL_LOCK:
            dual = _DUAL_CLASSES.get(cause_cls)
            if dual is None:
                name = f"RayTaskError({cause_cls.__name__})"
                dual = type(
                    name,
                    (RayTaskError, cause_cls),
                    {
                        "__module__": __name__,
                        "__qualname__": name,
                        "__getattr__": _dual_getattr,
                        "__reduce__": _dual_reduce,
                        "__str__": RayTaskError.__str__,
                        "__repr__": RayTaskError.__repr__,
                    },
                )
                _DUAL_CLASSES[cause_cls] = dual
        return dual

    def as_instanceof_cause(self) -> "RayTaskError":
        """An exception that is an instance of both RayTaskError and the cause's class.

        Returns self when the cause is already satisfied by RayTaskError or
        its class can't be subclassed (logged); the cause stays on `.cause`.
        """
        root = self._root_cause()
        if root is None or issubclass(RayTaskError, type(root)):
            return self
        if isinstance(self, type(root)):
            return self
        try:
            dual = self.make_dual_exception_type()
            obj = dual.__new__(dual)
        except Exception as e:  # noqa: BLE001 - refused subclassing, or a __new__ demanding args
            logger.warning("User exception type %s can't be combined with RayTaskError; raising "
                           "RayTaskError only (the original is on .cause): %s", type(root), e)
            return self
        obj.__dict__.update(self.__dict__)
        if isinstance(root, OSError):
            # errno & co. are C-level slots, not in __dict__: copy them over.
            for attr in ("errno", "strerror", "filename", "filename2"):
                try:
                    setattr(obj, attr, getattr(root, attr))
                except (AttributeError, TypeError):
                    pass
        obj.args = (self.cause,)
        obj.__cause__ = self.__cause__
        obj.__traceback__ = self.__traceback__
        return obj

    def _header(self) -> str:
        return f"{self.proctitle}()" + _ids(pid=self.pid, ip=self.ip, task_id=self.task_id,
                                           actor_id=self._actor_id, repr=self.actor_repr,
                                           node_id=self.node_id)

    def __str__(self) -> str:
        header = self._header()
        lines = self.traceback_str.strip("\n").split("\n") if self.traceback_str else []
        out = []
        skip_code = False
        for i, line in enumerate(lines):
            if line.startswith("Traceback "):
                out.append(header)
                skip_code = False
            elif line.startswith("  File ") and any(m in line for m in _INTERNAL_FRAME_MARKERS):
                skip_code = i + 1 < len(lines) and lines[i + 1].startswith("    ")
            elif skip_code:
                skip_code = False
            else:
                out.append(line)
        if not out or out[0] != header:
            out.insert(0, header)
        if len(out) == 1 and self.cause is not None:
            out.append(f"{type(self.cause).__name__}: {self.cause}")
        return "\n".join(out)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(function_name={self.function_name!r}, cause={self.cause!r})"


def _dual_getattr(self, name: str):
    # Only reached when normal lookup fails: expose the user exception's
    # attributes (e.g. `e.errno`, custom fields) on the dual instance.
    if name.startswith("__") or name == "cause":
        raise AttributeError(name)
    try:
        cause = self.__dict__["cause"]
    except KeyError:
        raise AttributeError(name) from None
    return getattr(cause, name)


def _dual_reduce(self):
    state = dict(self.__dict__)
    state["cause"] = _portable(state.get("cause"))
    return (_rebuild_dual, (state,))


def _rebuild_dual(state):
    base = RayTaskError.__new__(RayTaskError)
    base.__dict__.update(state)
    base.args = (state.get("function_name"), state.get("traceback_str"), state.get("cause"), None, None, None)
    return base.as_instanceof_cause()
