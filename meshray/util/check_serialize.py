"""Find what makes a value unpicklable (`ray.util.inspect_serializability`).

A value that cannot be sent to a task fails with the pickler's message,
which names a type but not where in the value it sits. This walks the
value (an object's attributes, a function's closure and globals, the items
of containers) down to `depth` levels, pickling each member with the same
pickler meshray uses, and reports the innermost members that fail: the
ones to fix.
"""
from __future__ import annotations

import inspect
from typing import Any, Iterator, Optional, Set, Tuple

from meshray.core import serialization

__all__ = ["FailureTuple", "inspect_serializability"]

_RULE = "=" * 60


class FailureTuple:
    """One member that failed to pickle: the object, its name, and the
    object it was found in (None at the top)."""

    def __init__(self, obj: Any, name: str, parent: Any):
        self.obj = obj
        self.name = name
        self.parent = parent

    def __repr__(self) -> str:
        return f"FailTuple({self.name} [obj={self.obj!r}, parent={self.parent!r}])"


def _pickle_error(obj) -> Optional[BaseException]:
    try:
        serialization.dumps(obj)
    except Exception as exc:  # noqa: BLE001 - the failure is what we report
        return exc
    return None


def _members(obj) -> Iterator[Tuple[str, str, Any]]:
    """(kind, name, value) of what pickling `obj` also pickles."""
    if inspect.ismethod(obj):
        yield "bound object", "__self__", obj.__self__
        yield "function", "__func__", obj.__func__
        return
    if inspect.isfunction(obj):
        try:
            closure = inspect.getclosurevars(obj)
        except (TypeError, ValueError):
            return
        for kind, table in (("global", closure.globals), ("closure variable", closure.nonlocals)):
            for name, value in table.items():
                if not inspect.ismodule(value):
                    yield kind, name, value
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield "item", repr(key), value
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        for index, value in enumerate(obj):
            yield "item", f"[{index}]", value
        return
    attributes = getattr(obj, "__dict__", None)
    if isinstance(attributes, dict) and not inspect.isclass(obj):
        for name, value in attributes.items():
            yield "attribute", name, value


class _Walker:
    def __init__(self, print_file):
        self.print_file = print_file
        self.failures: Set[FailureTuple] = set()
        self.seen: set = set()

    def say(self, level: int, text: str) -> None:
        print("    " * level + text, file=self.print_file)

    def walk(self, obj, name: str, parent, depth: int, level: int) -> bool:
        error = _pickle_error(obj)
        if error is None:
            return True
        self.say(level, f"!!! FAIL serialization of {name}: {error}")
        self.seen.add(id(obj))
        culprit_below = False
        if depth > 0:
            for kind, member_name, member in _members(obj):
                if id(member) in self.seen:
                    continue
                if _pickle_error(member) is None:
                    continue
                self.say(level + 1, f"checking {kind} {member_name!r} "
                                    f"({type(member).__name__})")
                self.walk(member, member_name, obj, depth - 1, level + 1)
                culprit_below = True
        if not culprit_below:
            self.failures.add(FailureTuple(obj, name, parent))
        return False


def inspect_serializability(base_obj: Any, name: Optional[str] = None, depth: int = 3,
                            print_file: Optional[Any] = None) -> Tuple[bool, Set[FailureTuple]]:
    """(True, set()) when `base_obj` pickles; else (False, the failing members).

    Prints what it checks to `print_file` (default: stdout). `depth` bounds
    how many levels of members are opened.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"inspect_serializability() argument depth={depth!r} must be an "
                         "int >= 0")
    name = name if name is not None else getattr(base_obj, "__name__", None) or repr(base_obj)
    walker = _Walker(print_file)
    print(_RULE, file=print_file)
    print(f"Checking serializability of {name}", file=print_file)
    print(_RULE, file=print_file)
    ok = walker.walk(base_obj, name, None, depth, 0)
    print(_RULE, file=print_file)
    if ok:
        print(f"{name} can be serialized.", file=print_file)
    else:
        found = ", ".join(sorted(f.name for f in walker.failures))
        print(f"{name} cannot be serialized; the members that fail: {found}", file=print_file)
    print(_RULE, file=print_file)
    return ok, walker.failures
