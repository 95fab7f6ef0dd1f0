"""Fuzz a private cluster's node daemon and an actor, then check what must hold.

After the fuzz run (fuzz.py) `run_local` checks, each a violation in the
report when it fails:
- the node daemon and the actor's worker are still running;
- no leak: their open file descriptors and threads, the daemon's worker
  processes and the store's unsealed reservations come back to within a
  small bound of what they were before the run (waited for, with a deadline);
- the daemon's log shows no handler exception, and malformed requests were
  logged, but rate-limited;
- normal work still works: a task, an actor call and a question to the node.
"""
from __future__ import annotations

import json
import os
import random
import re
import time

from meshray.rpc import call_link, make_channel
from meshray.rpc.session_link import SESSION_METHOD
from meshray.rpc.generated import meshray_pb2 as pb
from meshray.rpc.generated import meshray_pb2_grpc as pb_grpc
from meshray.testing import fuzz_cases as fc
from meshray.testing.fuzz import Report, Target, WireFuzzer

__all__ = ["FuzzTarget", "ask_node", "process_figures", "run_local"]

FD_SLACK, THREAD_SLACK, WORKER_SLACK = 16, 8, 0
# What strict.MalformedLog allows: lines per window, and the window.
LOG_BURST, LOG_WINDOW_S = 20, 10.0
_HANDLER_TROUBLE = re.compile(r"Traceback|failed to handle|Exception in callback|"
                              r"exception was never retrieved")
_REFUSED_LINE = "refused a malformed request"


class FuzzTarget:
    """The actor under test: `echo` returns its argument, so valid calls change nothing."""

    def echo(self, value=None):
        return value

    def pid(self) -> int:
        return os.getpid()


def _square(x):
    return x * x


def process_figures(pid: int) -> dict | None:
    """Open fds, threads, child processes and memory of `pid` (None when it is gone)."""
    import psutil
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        # rss is shown, not judged: freed Python memory rarely goes back to the OS.
        return {"fds": process.num_fds(), "threads": process.num_threads(),
                "children": len(process.children()),
                "rss_mib": round(process.memory_info().rss / 2 ** 20, 1)}
    except psutil.Error:
        return None


def ask_node(address: str, token: str | None, method: str, payload: dict | None = None,
             timeout: float = 20.0):
    """One JSON question on a fresh session with the node (its session
    link, `address` "unix:PATH"), as a driver asks it."""
    events = [fc._hello(random.Random()), pb.ClientEvent(request=pb.Request(
        request_id=1, method=method, payload=json.dumps(payload or {}).encode()))]
    link = call_link.connect(address, token=token, timeout=timeout,
                             magic=call_link.SESSION_MAGIC, tls=None)
    try:
        link.set_timeout(timeout)
        link.send(call_link.CALLS, pb.ClientBatch(events=events).SerializeToString())
        while (data := link.recv_reply()) is not None:
            for event in pb.ServerBatch.FromString(data).events:
                if event.WhichOneof("kind") == "reply":
                    if event.reply.error:
                        raise RuntimeError(f"the node did not answer {method}: {event.reply.error}")
                    return json.loads(event.reply.payload)
        raise RuntimeError(f"the node closed the session without answering {method}")
    except call_link.LinkClosed as exc:
        raise RuntimeError(f"the node closed the session without answering {method}: "
                           f"{exc.details}") from None
    finally:
        link.close()


def _log_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _log_since(path: str, offset: int) -> str:
    try:
        with open(path, errors="replace") as handle:
            handle.seek(offset)
            return handle.read()
    except OSError:
        return ""


def run_local(seed: int, cases: int = 10 ** 6, seconds: float = 20.0, *, first: int = 0,
              deadline_s: float = 10.0, settle_s: float = 30.0, echo=print,
              on_case=None) -> Report:
    """Start a private cluster with an actor, fuzz both, check, shut down."""
    import meshray
    from meshray import security

    token = security.generate_token()
    echo(f"wire fuzz: seed={seed} (replay one case: python -m chaos fuzz-wire "
         f"--seed {seed} --case N)")
    meshray.init(num_cpus=2, _token=token, log_to_driver=False)
    try:
        return _fuzz_cluster(meshray, token, seed, cases, seconds, first, deadline_s, settle_s,
                             echo, on_case)
    finally:
        meshray.shutdown()


def _fuzz_cluster(meshray, token, seed, cases, seconds, first, deadline_s, settle_s, echo,
                  on_case):
    from meshray.core import state as state_mod

    core, node = state_mod.state.core, state_mod.state.local_node
    actor = meshray.remote(FuzzTarget).remote()
    actor_pid = meshray.get(actor.pid.remote(), timeout=60)
    record = core.request("actor_info", {"actor_id": actor._actor_id.hex()})
    with make_channel(node.address, token=token) as channel:
        info = pb_grpc.NodeServiceStub(channel).GetNodeInfo(pb.NodeInfoRequest(), timeout=20)
    log_path = os.path.join(info.session_dir, "node.log")
    targets = [
        Target("node", [node.address],
               fc.Context(node_id=info.node_id, actor_id=actor._actor_id), info.pid),
        Target("session", [node.local_address],
               fc.Context(node_id=info.node_id, actor_id=actor._actor_id), info.pid,
               link=SESSION_METHOD),
        Target("actor", [a for a in record["address"].split(",") if a],
               fc.Context(node_id=info.node_id, actor_id=actor._actor_id,
                          actor_methods=("echo",)), actor_pid, link=call_link.CALL_METHOD),
    ]
    fuzzer = WireFuzzer(targets, token, seed, deadline_s)
    report = Report(seed)
    try:
        fuzzer.probe()
        report.checks["served"] = {t.name: sorted({m.service for m in t.methods})
                                   for t in targets}
        _warm_up(fuzzer, targets)
        before = _figures(targets, node.local_address, token, core.store_dir)
        offset = _log_size(log_path)
        fuzzer.run(cases, seconds, first=first, report=report, on_violation=echo,
                   on_case=on_case)
        _check_alive(report, targets)
        after = _settle(report, targets, node.local_address, token, core.store_dir, before, settle_s)
        report.checks["before"], report.checks["after"] = before, after
        _check_log(report, _log_since(log_path, offset))
        _check_work(report, meshray, actor, node.local_address, token)
        _check_alive(report, targets)
    finally:
        fuzzer.close()
    return report


def _warm_up(fuzzer: WireFuzzer, targets: list) -> None:
    """A few valid calls to every method, so gRPC's own threads and
    descriptors exist before the baseline is taken."""
    rng = random.Random(0)
    for target in targets:
        for method in target.methods:
            for address in target.addresses:
                made = fc.template(method.request_class, rng, target.context)
                if made is None:
                    continue
                case = fc.Case(-1, "warm-up", target.name, method.path, method.shape,
                               [made[0].SerializeToString()], fc.ACCEPTED)
                fuzzer.run_case(case, address)


def _store_files(store_dir: str) -> int:
    return sum(len(files) for _root, _dirs, files in os.walk(store_dir))


def _figures(targets: list, node_address: str, token: str, store_dir: str) -> dict:
    figures = {t.name: process_figures(t.pid) for t in targets}
    figures["store_files"] = _store_files(store_dir)
    try:
        figures["store_reserved"] = ask_node(node_address, token, "store_stats")["num_reserved"]
    except Exception as exc:  # noqa: BLE001 - reported as the figure
        figures["store_reserved"] = f"unavailable: {exc}"
    return figures


def _check_alive(report: Report, targets: list) -> None:
    for target in targets:
        if process_figures(target.pid) is None:
            message = f"the {target.name} process (pid {target.pid}) is gone"
            if message not in report.violations:
                report.violations.append(message)


def _leaks(before: dict, after: dict, targets: list) -> list:
    problems = []
    for target in targets:
        was, now = before.get(target.name), after.get(target.name)
        if was is None or now is None:
            continue
        for key, slack in (("fds", FD_SLACK), ("threads", THREAD_SLACK),
                           ("children", WORKER_SLACK)):
            if now[key] > was[key] + slack:
                problems.append(f"{target.name} {key}: {was[key]} before, {now[key]} after "
                                f"(allowed +{slack})")
    if after["store_files"] > before["store_files"]:
        problems.append(f"files in the node's store: {before['store_files']} before, "
                        f"{after['store_files']} after")
    if isinstance(before.get("store_reserved"), int) and isinstance(after.get("store_reserved"),
                                                                    int):
        if after["store_reserved"] > before["store_reserved"]:
            problems.append(f"store reservations: {before['store_reserved']} before, "
                            f"{after['store_reserved']} after")
    elif not isinstance(after.get("store_reserved"), int):
        problems.append(f"store reservations: {after.get('store_reserved')}")
    return problems


def _settle(report: Report, targets, node_address, token, store_dir, before: dict,
            settle_s: float):
    """Wait (with a deadline) for every figure to come back within its bound."""
    deadline = time.monotonic() + settle_s
    while True:
        after = _figures(targets, node_address, token, store_dir)
        problems = _leaks(before, after, targets)
        if not problems or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    report.violations.extend(f"leak: {p} ({settle_s:.0f}s after the run)" for p in problems)
    return after


def _check_log(report: Report, text: str) -> None:
    trouble = [line for line in text.splitlines() if _HANDLER_TROUBLE.search(line)]
    if trouble:
        report.violations.append("the node daemon logged handler exceptions during the run: "
                                 + " | ".join(trouble[:5]))
    refused = text.count(_REFUSED_LINE)
    windows = int(report.seconds / LOG_WINDOW_S) + 2
    report.checks["refusals_logged"] = refused
    if report.by_expect.get(fc.INVALID) and not refused:
        report.violations.append("no malformed request was logged by the node daemon")
    if refused > LOG_BURST * windows:
        report.violations.append(f"{refused} refusal lines in {report.seconds:.0f}s: the log "
                                 f"is not rate-limited (at most {LOG_BURST} per "
                                 f"{LOG_WINDOW_S:.0f}s)")


def _check_work(report: Report, meshray, actor, node_address: str, token: str) -> None:
    checks = {
        "a task": lambda: meshray.get(meshray.remote(_square).remote(7), timeout=60) == 49,
        "an actor call": lambda: meshray.get(actor.echo.remote("still here"),
                                             timeout=60) == "still here",
        "a question to the node": lambda: bool(ask_node(node_address, token, "nodes")),
    }
    for what, check in checks.items():
        try:
            ok = check()
        except Exception as exc:  # noqa: BLE001 - reported as a violation
            ok, why = False, f"{type(exc).__name__}: {exc}"
        else:
            why = "wrong answer"
        report.checks[f"after the run, {what}"] = "ok" if ok else why
        if not ok:
            report.violations.append(f"after the run, {what} failed: {why}")
