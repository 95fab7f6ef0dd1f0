"""`python -m chaos fuzz-wire`: malformed requests, sent with the cluster token.

    python -m chaos fuzz-wire --seed 7 --duration 60
    python -m chaos fuzz-wire --seed 7 --case 1234        # replay one case, verbosely
    python -m chaos fuzz-wire --address 127.0.0.1:7700 --token-file secrets/token \\
        [--actor 127.0.0.1:41234 --actor-id HEX]

Without --address it starts a private cluster with an actor and checks
afterwards that both survived, leaked nothing and still work
(meshray/testing/fuzz_local.py). With --address it fuzzes a running node
(its session link too when the node runs on this machine) and an actor, if
given, and checks only that they still answer. The engine
is meshray/testing/fuzz.py. Exit status: 0 no violation, 1 violations, 2 the
run could not be carried out.
"""
from __future__ import annotations

import json
import os
import random
import sys

import grpc

__all__ = ["add_parser", "main"]


def add_parser(sub) -> None:
    fuzz = sub.add_parser("fuzz-wire", help="send malformed requests (with the token) to "
                          "every method of a node and an actor; check answers and survival")
    fuzz.add_argument("--seed", type=int, default=None, help="default: a random one (printed)")
    fuzz.add_argument("--cases", type=int, default=10 ** 6, help="at most this many cases")
    fuzz.add_argument("--duration", type=float, default=30.0, help="at most this many seconds")
    fuzz.add_argument("--case", type=int, default=None, help="replay only this case of the seed")
    fuzz.add_argument("--deadline", type=float, default=10.0,
                      help="seconds each call may take before it counts as a hang")
    fuzz.add_argument("--address", help="fuzz this running node (HOST:PORT or unix:PATH)")
    fuzz.add_argument("--token-file", help="its cluster token (or MESHRAY_TOKEN[_FILE])")
    fuzz.add_argument("--token", help="its cluster token (visible in ps; prefer --token-file)")
    fuzz.add_argument("--actor", help="with --address: also fuzz the actor at this address")
    fuzz.add_argument("--actor-id", help="its id (hex), so that valid calls can be made")
    fuzz.add_argument("--report", help="write the JSON report here")


def _echo(line: str) -> None:
    print(line, flush=True)


def _verbose(case, code, details) -> None:
    _echo(f"{case.describe()}\n  -> {code} {details}")


def _external(args, seed: int):
    from meshray import security
    from meshray.rpc import make_channel
    from meshray.rpc.generated import meshray_pb2 as pb
    from meshray.rpc.generated import meshray_pb2_grpc as pb_grpc
    from meshray.testing import fuzz_cases as fc
    from meshray.testing.fuzz import Report, Target, WireFuzzer
    from meshray.rpc import call_link
    from meshray.rpc.session_link import SESSION_METHOD, session_address
    from meshray.testing.fuzz_local import ask_node

    token = security.resolve_token(args.token, args.token_file)
    with make_channel(args.address, token=token) as channel:
        info = pb_grpc.NodeServiceStub(channel).GetNodeInfo(pb.NodeInfoRequest(), timeout=20)
    actor_id = bytes.fromhex(args.actor_id) if args.actor_id else b""
    targets = [Target("node", [args.address], fc.Context(node_id=info.node_id), info.pid)]
    session = session_address(info.session_dir, info.node_id)
    if os.path.exists(session[len("unix:"):]):
        # Sessions are opened on the node's machine only: fuzzed when it is this one.
        targets.append(Target("session", [session], fc.Context(node_id=info.node_id),
                              info.pid, link=SESSION_METHOD))
    if args.actor:
        targets.append(Target("actor", [args.actor], fc.Context(
            node_id=info.node_id, actor_id=actor_id, actor_methods=()),
            link=call_link.CALL_METHOD))
    fuzzer = WireFuzzer(targets, token, seed, args.deadline)
    report = Report(seed)
    try:
        fuzzer.probe()
        first, cases = (args.case, 1) if args.case is not None else (0, args.cases)
        fuzzer.run(cases, args.duration, first=first, report=report, on_violation=_echo,
                   on_case=_verbose if args.case is not None else None)
    finally:
        fuzzer.close()
    try:
        with make_channel(args.address, token=token) as channel:
            pb_grpc.NodeServiceStub(channel).GetNodeInfo(pb.NodeInfoRequest(), timeout=20)
        if os.path.exists(session[len("unix:"):]):
            ask_node(session, token, "nodes")
        report.checks["after the run, a question to the node"] = "ok"
    except Exception as exc:  # noqa: BLE001 - reported as a violation
        report.violations.append(f"after the run, the node does not answer: {exc}")
    return report


def main(args) -> int:
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10 ** 6)
    try:
        if args.address:
            report = _external(args, seed)
        else:
            from meshray.testing.fuzz_local import run_local
            first, cases = (args.case, 1) if args.case is not None else (0, args.cases)
            report = run_local(seed, cases, args.duration, first=first, deadline_s=args.deadline,
                               echo=_echo, on_case=_verbose if args.case is not None else None)
    except (ValueError, ConnectionError, RuntimeError, OSError, grpc.RpcError) as exc:
        print(f"fuzz-wire: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    if args.report:
        with open(args.report, "w") as handle:
            json.dump({"seed": report.seed, "cases": report.cases, "seconds": report.seconds,
                       "kinds": report.by_kind, "answers": report.by_code,
                       "checks": report.checks, "violations": report.violations},
                      handle, indent=2, default=str)
    return 0 if report.ok else 1
