"""Entry point of a worker process (started by its node daemon)."""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

from meshray.common.heap import settle_heap


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL us if the daemon dies, so no worker is orphaned."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def main() -> None:
    _die_with_parent()
    parent = os.getppid()
    if parent == 1:
        sys.exit(1)
    logging.basicConfig(level=os.environ.get("MESHRAY_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from meshray import security
    from meshray.core import ray_alias, state as state_mod
    from meshray.core.core_worker import CoreWorker
    from meshray.core.executor import TaskExecutor
    from meshray.core.lease_host import LeaseHost

    if os.environ.get(ray_alias.ENV_VAR) == "1":
        ray_alias.install()    # a job started by `meshray run`: its code may `import ray`
    executor = TaskExecutor()
    token = security.process_token()     # read once from the pipe the daemon passed
    worker_id = bytes.fromhex(os.environ["MESHRAY_WORKER_ID"])
    # Listening before the hello, which names the address, so a lease
    # granted on this worker finds it serving.
    try:
        executor.lease_host = LeaseHost(executor, session_dir=os.environ["MESHRAY_SESSION_DIR"],
                                        worker_id=worker_id, token=token)
    except OSError as exc:
        # (e.g. a session directory too deep for a unix socket's path): this
        # worker serves no leases, and runs everything its node sends it.
        logging.getLogger(__name__).warning("worker %s serves no worker leases: %s",
                                            worker_id.hex(), exc)
    core = CoreWorker(
        daemon_address=os.environ["MESHRAY_DAEMON_ADDRESS"],
        token=token,
        role="worker",
        worker_id=worker_id,
        on_execute=executor.enqueue,
        on_kill=executor.kill,
        call_address=executor.lease_host.address if executor.lease_host else "",
        on_lease=executor.lease_host.on_lease if executor.lease_host else None,
    )
    executor.core = core
    state_mod.state.core = core
    state_mod.state.mode = "worker"
    settle_heap()
    executor.run_forever()


if __name__ == "__main__":
    main()
