"""The task-context line a worker writes and its daemon reads (meshray/common/worker_output.py)."""
from meshray.common.worker_output import CONTEXT_MARKER, context_line, parse_context_line


def test_the_daemon_reads_back_what_the_worker_wrote():
    line = context_line("00ff" * 4, "module.Class.method with spaces")
    assert line.endswith("\n") and line.count("\n") == 1
    assert parse_context_line(line[:-1]) == ("00ff" * 4, "module.Class.method with spaces")


def test_ordinary_output_is_not_a_context_line():
    assert parse_context_line("hello world") is None
    assert parse_context_line("") is None
    # The marker counts only at the start of a line.
    assert parse_context_line(f"print says {CONTEXT_MARKER}ab f") is None
