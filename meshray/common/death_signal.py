"""Tie a child process to the thread that starts it, without ``preexec_fn``.

Children that must not outlive their starter (etcd members, job entrypoints)
ask Linux for a parent-death signal (``PR_SET_PDEATHSIG``). Setting it from
a ``preexec_fn`` runs Python in the forked child of a threaded process,
where fork handlers of other libraries (gRPC's) can abort the child; without
``preexec_fn`` CPython can vfork and nothing runs between fork and exec.

So the signal is set by a small program at the head of the command instead:
util-linux ``setpriv --pdeathsig KILL --``, or, where that is missing, a
fresh single-threaded Python that calls prctl and execs the command. The
kernel ties the signal to the starting *thread*, so callers start children
from a thread that lives as long as the child should.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys

__all__ = ["death_signal_prefix", "PYTHON_EXEC_WRAPPER"]

log = logging.getLogger(__name__)

PYTHON_EXEC_WRAPPER = (
    "import ctypes,os,signal,sys\n"
    "ctypes.CDLL(None,use_errno=True).prctl(1,signal.SIGKILL,0,0,0)\n"
    # The starter may have died before prctl: then nobody would kill us.
    "os.getppid()==int(sys.argv[1]) or os._exit(1)\n"
    "os.execvp(sys.argv[2],sys.argv[2:])\n"
)
"""Run as ``python -I -S -c PYTHON_EXEC_WRAPPER <starter pid> CMD...``."""


@functools.lru_cache(maxsize=1)
def _setpriv_prefix() -> tuple[str, ...]:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        log.debug("setpriv not found: children get their death signal from a Python wrapper")
        return ()
    try:
        usage = subprocess.run([setpriv, "--help"], capture_output=True, text=True,
                               timeout=5, check=False, stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("setpriv unusable (%s): children get their death signal from a Python "
                  "wrapper", exc)
        return ()
    if "--pdeathsig" not in usage:
        log.debug("%s has no --pdeathsig (util-linux < 2.33): children get their death "
                  "signal from a Python wrapper", setpriv)
        return ()
    return (setpriv, "--pdeathsig", "KILL", "--")


def death_signal_prefix() -> tuple[str, ...]:
    """The command prefix that makes the child die with the calling thread
    (empty off Linux, where there is no such signal)."""
    if not sys.platform.startswith("linux"):
        return ()
    return _setpriv_prefix() or (sys.executable, "-I", "-S", "-c", PYTHON_EXEC_WRAPPER,
                                 str(os.getpid()))
