"""The line a worker writes before each task's output, naming the task.

A worker's stdout and stderr reach its node daemon through plain pipes, so
the worker (meshray.core) marks where one task's output starts and the
daemon (meshray.node) reads the mark to forward what follows to the driver
that owns that task. Both sides must agree on the format, hence it lives here.
"""
from __future__ import annotations

__all__ = ["CONTEXT_MARKER", "context_line", "parse_context_line"]

# Control characters no program prints by accident start the line.
CONTEXT_MARKER = "\x1emeshray-ctx\x1f"


def context_line(job_hex: str, task_name: str) -> str:
    """The marker line (newline included) that says job `job_hex`'s `task_name` runs next."""
    return f"{CONTEXT_MARKER}{job_hex} {task_name}\n"


def parse_context_line(line: str) -> tuple[str, str] | None:
    """(job id hex, task name) when `line` is a marker line (without its newline), else None."""
    if not line.startswith(CONTEXT_MARKER):
        return None
    job_hex, _, task_name = line[len(CONTEXT_MARKER):].partition(" ")
    return job_hex, task_name
