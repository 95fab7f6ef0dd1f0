"""`meshray run script.py [args...]`: run an unmodified Ray Core script on meshray.

Also `python -m meshray.run script.py [args...]`. The script runs in this
process as `python script.py` would run it -- `__name__ == "__main__"`,
`sys.argv == [script, *args]`, the script's directory first on `sys.path`,
its exit status and uncaught exceptions as Python reports them -- except that
`import ray` (and `ray.util`, `ray.exceptions`, ...) gives meshray, in this
process and in the workers of the jobs it starts (core/ray_alias.py).
Nothing outside this process changes: no files, no inherited variables.
"""
from __future__ import annotations

import builtins
import io
import os
import sys
import types

__all__ = ["main", "run_script"]

USAGE = "usage: meshray run SCRIPT [ARGS...]"


def _script_traceback(tb, script: str):
    """`tb` from the script's first frame on, as `python script.py` shows it."""
    while tb is not None and tb.tb_frame.f_code.co_filename != script:
        tb = tb.tb_next
    return tb


def run_script(script: str, args: list[str]) -> int:
    """Run `script` with `args` as its command line; the exit status to return."""
    from meshray.core import ray_alias

    path = os.path.abspath(script)
    if not os.path.isfile(path):
        print(f"meshray run: script {script!r} is not a file (expected the path of a "
              "Python script)", file=sys.stderr)
        return 2
    with io.open_code(path) as handle:
        source = handle.read()
    ray_alias.install()
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(path)
    # The script becomes __main__ for good (not for the call only, as runpy
    # does): pickling and exit handlers after it returns still find its names.
    main_module = types.ModuleType("__main__")
    main_module.__file__ = path
    main_module.__builtins__ = builtins
    sys.modules["__main__"] = main_module
    try:
        exec(compile(source, path, "exec"), main_module.__dict__)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:   # noqa: BLE001 - reported as the interpreter would
        tb = _script_traceback(exc.__traceback__, path)
        sys.excepthook(type(exc), exc.with_traceback(tb), tb)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + (__doc__ or "").split("\n\n", 1)[1].strip(),
              file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    return run_script(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
