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


def test_drain_output_passes_on_what_a_pipe_holds_without_the_loop(tmp_path):
    """What a driver's flush_output question relies on: lines already in a
    worker's pipes are read and passed on at once, not when the loop next
    gets to the pipe."""
    import os
    from types import SimpleNamespace

    from meshray.node.worker_pool import WorkerPool

    seen = []
    pool = WorkerPool(daemon_address="127.0.0.1:1", token=None, session_dir=str(tmp_path),
                      on_output=lambda worker, line, is_err: seen.append((line, is_err)))
    pipes = [os.pipe(), os.pipe()]
    streams = []
    for read_fd, _write_fd in pipes:
        os.set_blocking(read_fd, False)
        streams.append(os.fdopen(read_fd, "rb", buffering=0))
    worker = SimpleNamespace(process=SimpleNamespace(stdout=streams[0], stderr=streams[1]),
                             actor=None, job_hex="", task_name="", log_names=())
    os.write(pipes[0][1], b"bar: 100%\nlast ")
    os.write(pipes[1][1], b"warning\n")
    try:
        pool.drain_output(worker)
        assert seen == [("bar: 100%", False), ("warning", True)]
        pool.drain_output(worker)              # nothing new: nothing passed on
        assert len(seen) == 2
    finally:
        for stream in streams:
            stream.close()
        for _read_fd, write_fd in pipes:
            os.close(write_fd)
