"""`meshray logs`: Ray's `ray logs` -- list a node's log files, print or follow one.

    meshray logs [GLOB]                 files of a node (the one attached to by
                                        default); one match is printed instead
    meshray logs cluster [GLOB]         the same
    meshray logs actor --id ID          an actor's worker output (or --pid)
    meshray logs task --id ID           the output of the worker that ran a task
    meshray logs worker --pid PID       a worker's output (--node-id: on that node)

Flags as in Ray: --node-id/--node-ip, --follow/-f, --tail N (default 1000,
-1 for all), --err (stderr rather than stdout), --interval, --timeout.
"""
from __future__ import annotations

import sys

__all__ = ["add_parser"]

KINDS = ("cluster", "actor", "task", "worker")


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "logs", help="list or print the log files of any node (as `ray logs`)",
        description=__doc__.split("\n\n", 1)[1], formatter_class=_raw_formatter())
    parser.add_argument("words", nargs="*", metavar="[cluster|actor|task|worker] [GLOB]")
    parser.add_argument("--id", dest="entity_id", help="actor or task id (hex)")
    parser.add_argument("--pid", type=int, help="worker process id")
    parser.add_argument("--node-id", help="node whose files to read (default: the one "
                        "attached to, or where the actor/task ran)")
    parser.add_argument("--node-ip", help="node address, when one node has it")
    parser.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
    parser.add_argument("--tail", type=int, default=1000,
                        help="lines from the end to print first (-1: all; default 1000)")
    parser.add_argument("--err", action="store_true", help="the stderr file (.err) of a worker")
    parser.add_argument("--interval", type=float, help="seconds between polls with --follow")
    parser.add_argument("--timeout", type=int, default=30, help="seconds to wait for an answer")
    parser.add_argument("--address", help="cluster to attach to (default: auto)")
    parser.set_defaults(func=_cmd_logs)


def _raw_formatter():
    import argparse
    return argparse.RawDescriptionHelpFormatter


def _fail(message: str) -> int:
    print(f"meshray logs: {message}", file=sys.stderr)
    return 2


def _cmd_logs(args) -> int:
    words = list(args.words)
    kind = words.pop(0) if words and words[0] in KINDS else "cluster"
    if len(words) > 1 or (words and kind != "cluster"):
        return _fail(f"unexpected arguments {words!r}: a glob goes with `logs [cluster]` only")
    glob = words[0] if words else None
    target = {"node_id": args.node_id, "node_ip": args.node_ip}
    if kind == "actor" and not (args.entity_id or args.pid):
        return _fail("`logs actor` needs --id ACTOR_ID (or --pid PID)")
    if kind == "task" and not args.entity_id:
        return _fail("`logs task` needs --id TASK_ID")
    if kind == "worker" and not args.pid:
        return _fail("`logs worker` needs --pid PID")
    import meshray
    from meshray.util.state.common import RayStateApiException
    from meshray.util.state.logs import get_log, list_logs
    meshray.init(address=args.address or "auto", log_to_driver=False)
    try:
        read = dict(follow=args.follow, tail=args.tail, timeout=args.timeout,
                    suffix="err" if args.err else "out", _interval=args.interval, **target)
        if kind == "cluster":
            files = list_logs(glob_filter=glob, timeout=args.timeout, **target)
            names = [name for group in files.values() for name in group]
            if glob and len(names) == 1:
                return _print(get_log(filename=names[0], **read))
            _print_listing(files)
            return 0
        if kind == "task":
            return _print(get_log(task_id=args.entity_id, **read))
        if kind == "actor" and args.entity_id:
            return _print(get_log(actor_id=args.entity_id, **read))
        return _print(get_log(pid=args.pid, **read))
    except (ValueError, RayStateApiException) as exc:
        return _fail(str(exc))
    finally:
        meshray.shutdown()


def _print(chunks) -> int:
    try:
        for chunk in chunks:
            sys.stdout.write(chunk)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    return 0


def _print_listing(files: dict) -> None:
    if not files:
        print("(no log files matched)")
    for group in sorted(files):
        print(f"{group}:")
        for name in files[group]:
            print(f"  {name}")
