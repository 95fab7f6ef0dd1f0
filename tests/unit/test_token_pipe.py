"""Handing the cluster token to a child process on a pipe instead of its environment."""
from __future__ import annotations

import os
import subprocess
import sys

from meshray import security


def test_environment_without_token_drops_every_route_to_it():
    env = {"PATH": "/bin", security.TOKEN_ENV: "t" * 20, security.TOKEN_FILE_ENV: "/x",
           security.TOKEN_FD_ENV: "9"}
    assert security.environment_without_token(env) == {"PATH": "/bin"}


def test_token_reaches_a_child_on_a_pipe_and_nowhere_else():
    """The child reads the token once, closes the pipe, and has no variable left."""
    token = security.generate_token()
    fd = security.token_pipe(token)
    code = (
        "import os, sys\n"
        "from meshray import security\n"
        "fd = int(os.environ[security.TOKEN_FD_ENV])\n"
        "token = security.process_token()\n"
        "assert security.process_token() is token\n"
        "try:\n"
        "    os.fstat(fd)\n"
        "    closed = False\n"
        "except OSError:\n"
        "    closed = True\n"
        "left = [k for k in os.environ if 'MESHRAY_TOKEN' in k]\n"
        "print(token, closed, left)\n")
    env = security.environment_without_token(os.environ)
    env[security.TOKEN_FD_ENV] = str(fd)
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, pass_fds=(fd,),
                             capture_output=True, text=True, timeout=60)
    finally:
        os.close(fd)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [token, "True", "[]"]


def test_bad_handover_fd_is_a_clear_error():
    env = security.environment_without_token(os.environ)
    env[security.TOKEN_FD_ENV] = "not-a-number"
    out = subprocess.run([sys.executable, "-c",
                          "from meshray import security; security.process_token()"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "MESHRAY_TOKEN_FD='not-a-number' must be a file descriptor number" in out.stderr


def test_a_token_pipe_numbered_past_select_s_limit_is_read():
    """A node of a big cluster holds thousands of descriptors (a link per
    peer), so its worker inherits the token pipe under a number past
    select()'s FD_SETSIZE (1,024); the worker must still read it."""
    import resource
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    high = 1500
    assert soft > high, f"RLIMIT_NOFILE {soft}: this test needs descriptors past {high}"
    token = security.generate_token()
    fd = security.token_pipe(token)
    os.dup2(fd, high)
    os.close(fd)
    assert security._read_handover(str(high)) == token
    try:
        os.fstat(high)
        raise AssertionError("the handover left the pipe open")
    except OSError:
        pass
