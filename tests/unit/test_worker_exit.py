"""How a dead worker's end is described in WorkerCrashedError."""
from meshray.node.worker_pool import describe_exit


def test_describe_exit_names_codes_and_signals():
    assert describe_exit(-9) == "killed by signal 9 (SIGKILL)"
    assert describe_exit(-15) == "killed by signal 15 (SIGTERM)"
    assert describe_exit(3) == "exited with code 3"
    assert "did not exit" in describe_exit(None)
