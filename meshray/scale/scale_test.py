"""`meshray scale-test`: a cluster of real and hollow nodes, measured.

It starts an etcd member (as the test harness does: auth on, a fresh token)
or joins one given with --address, real node daemons (`--real-nodes`, with
real workers) and ceil(N/K) host processes of K hollow nodes each
(meshray/scale/host.py), then runs the scenarios in order:

- ``join``: until every hollow node is registered and sees every node
  (``join_s`` counts from the first host's start);
- ``idle``: etcd writes per second and watch events per node per second
  while nothing happens;
- ``tasks``: a real driver on the real node submits many tiny tasks that
  spill onto hollow nodes; every result is checked (``many_tasks_per_s``),
  and etcd writes are counted meanwhile (``etcd_writes_per_s_busy``);
- ``actors``: the driver creates many small actors (``--actors`` of
  ``--actor-cpus``) and waits for each creation (``many_actors_per_s``);
- ``pgs``: the driver creates ``--pgs`` placement groups of ``--pg-bundles``
  one-CPU bundles, waits for each, removes them all; every change to the
  reservations meanwhile is recorded and replayed revision by revision
  (``pg_overcommit_violations`` must be 0) and ``many_pgs_per_s`` counts
  the creations;
- after ``tasks`` and ``actors``: ``spill_decision_p99_ms``, the p99 bucket
  bound of the real node's placement-decision histogram;
- ``detect``: one hollow node, then 10% of them, are killed (--kill-mode:
  their keepalives stop; with ``crash`` their ports close too); each
  surviving hollow node notes when its view dropped each; latency = seen -
  killed, one observation per (observer, killed node).

etcd writes are etcd's own counter ``etcd_server_proposals_committed_total``
(every raft proposal the member applied: puts, deletes, transactions, lease
grants and revokes; keepalives are not proposals). Results no scenario
measured are null, never estimated.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

from meshray.scale import drivers
from meshray.scale.host import ETCD_CONNECTIONS, _number

__all__ = ["add_parser", "run", "percentile", "detection_latencies", "render_table",
           "SCENARIOS", "RESULT_KEYS", "check_tasks"]

SCENARIOS = ("join", "idle", "tasks", "actors", "pgs", "detect")
RESULT_KEYS = ("nodes", "real_nodes", "nodes_joined", "join_s", "etcd_writes_per_s_idle",
               "etcd_writes_per_s_busy", "watch_events_per_node_per_s", "detect_p50_s",
               "detect_p99_s", "detect_10pct_p50_s", "detect_10pct_p99_s", "detect_missed",
               "many_tasks_per_s", "many_tasks_checked", "many_actors_per_s", "many_pgs_per_s",
               "spill_decision_p99_ms")
WRITE_COUNTER = "etcd_server_proposals_committed_total"
# A line of gRPC core's own log (absl format: severity letter, MMDD, time).
_GRPC_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+:\d+\]")
KILL_MODES = ("freeze", "crash")


# ------------------------------------------------------------------ pure parts
def percentile(values: list, q: float) -> float | None:
    """The q-th percentile (0..100, nearest rank) of `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def detection_latencies(killed: dict, deaths: dict) -> tuple[list, int]:
    """Seconds from each kill to each surviving observer seeing it, and how
    many (observer, killed node) pairs never saw it.

    `killed`: node -> kill time; `deaths`: observer -> {node: time seen}.
    Observers that were themselves killed are not asked.
    """
    latencies, missed = [], 0
    for observer, seen in deaths.items():
        if observer in killed:
            continue
        for node, at in killed.items():
            if node in seen:
                latencies.append(max(0.0, seen[node] - at))
            else:
                missed += 1
    return latencies, missed


def check_tasks(values: list, hollow_ids: set) -> tuple[int, list, dict]:
    """(correct results, the first wrong ones, tasks run per node id or "real").

    A task run by a real worker returns ("real", its index); one run by a
    hollow node returns that node's fixed value (node/hollow.py).
    """
    good, bad, by_node = 0, [], {}
    for index, value in enumerate(values):
        value = tuple(value) if isinstance(value, (list, tuple)) else value
        if value == ("real", index):
            where = "real"
        elif isinstance(value, tuple) and len(value) == 2 and value[0] == "hollow" \
                and value[1] in hollow_ids:
            where = value[1]
        else:
            if len(bad) < 5:
                bad.append((index, value))
            continue
        good += 1
        by_node[where] = by_node.get(where, 0) + 1
    return good, bad, by_node


def render_table(result: dict) -> str:
    rows = [(key, result.get(key)) for key in RESULT_KEYS]
    width = max(len(key) for key, _ in rows)
    lines = [f"{'metric'.ljust(width)}  value", f"{'-' * width}  -----"]
    for key, value in rows:
        shown = "-" if value is None else (f"{value:.3f}" if isinstance(value, float) else value)
        lines.append(f"{key.ljust(width)}  {shown}")
    return "\n".join(lines)


# ------------------------------------------------------------------ the run
class HostProcess:
    """One `meshray.scale.host` child and its JSON-line conversation."""

    def __init__(self, args, index: int, count: int, address: str, token: str, base_dir: str):
        from meshray import security
        env = dict(os.environ)
        for name in ("MESHRAY_TOKEN", "MESHRAY_TOKEN_FILE"):
            env.pop(name, None)
        fd = security.token_pipe(token)
        env[security.TOKEN_FD_ENV] = str(fd)
        command = [sys.executable, "-m", "meshray.scale.host", "--nodes", str(count),
                   "--address", address, "--base-dir", os.path.join(base_dir, f"host{index}"),
                   "--cpus", str(args.cpus), "--task-s", str(args.task_s),
                   "--etcd-connection", args.etcd_connection]
        if args.lease_ttl:
            command += ["--lease-ttl", str(args.lease_ttl)]
        if args.join_rate:
            hosts = math.ceil(args.nodes / args.nodes_per_host)
            command += ["--start-interval", f"{hosts / args.join_rate:.6f}"]
        try:
            self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            env=env, pass_fds=(fd,), text=True)
        finally:
            os.close(fd)
        self.nodes: list[str] = []
        self.ready = False          # it said so: it reads commands now

    def wait_ready(self, timeout: float) -> None:
        line = self._read(timeout)
        self.nodes = list(line["nodes"])
        self.ready = True

    def _read(self, timeout: float) -> dict:
        from meshray.common.fd_wait import wait_readable
        deadline = time.monotonic() + timeout
        while True:
            if wait_readable(self.process.stdout, deadline - time.monotonic()):
                line = self.process.stdout.readline()
                if not line:
                    raise RuntimeError(f"hollow host pid {self.process.pid} exited "
                                       f"(status {self.process.poll()})")
                reply = json.loads(line)
                if "error" in reply:
                    raise RuntimeError(f"hollow host pid {self.process.pid}: {reply['error']}")
                return reply
            if time.monotonic() >= deadline:
                raise TimeoutError(f"hollow host pid {self.process.pid} did not answer "
                                   f"within {timeout:.0f}s")

    def ask(self, command: dict, timeout: float = 60.0) -> dict:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self._read(timeout)

    def begin_close(self) -> None:
        """Tell the host to stop its nodes (the reply is read by finish_close)."""
        if self.process.poll() is not None:
            return
        try:
            if self.ready:
                self.process.stdin.write(json.dumps({"op": "stop"}) + "\n")
                self.process.stdin.flush()
            else:
                # Still starting its nodes: SIGTERM stops the ones started (host.py).
                self.process.terminate()
        except OSError:
            pass

    def finish_close(self, timeout: float = 60.0) -> None:
        """Wait (up to `timeout`) for the host to exit, else kill it."""
        if self.process.poll() is None:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        self.process.stdout.close()

    def close(self, timeout: float = 60.0) -> None:
        self.begin_close()
        self.finish_close(timeout)


def etcd_counter(endpoint: str, name: str = WRITE_COUNTER) -> float:
    """A counter from the etcd member's own /metrics page (plain HTTP)."""
    with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=5.0) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise KeyError(f"etcd at {endpoint} has no metric {name!r}")


class ScaleRun:
    def __init__(self, args):
        self.args = args
        self.engine = None
        self.hosts: list[HostProcess] = []
        self.real = []
        self.base_dir = tempfile.mkdtemp(prefix="meshray-scale-")
        self.result: dict = {key: None for key in RESULT_KEYS}
        self.result.update(nodes=args.nodes, real_nodes=args.real_nodes,
                           lease_ttl_s=args.lease_ttl or 5.0, kill_mode=args.kill_mode,
                           etcd_connection=args.etcd_connection)
        self.rng = random.Random(args.seed)

    @property
    def hollow_ids(self) -> list[str]:
        return [node for host in self.hosts for node in host.nodes]

    def _say(self, text: str) -> None:
        if not self.args.quiet:
            print(f"[scale-test {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    def start(self) -> None:
        from meshray.testing.engine import ClusterEngine
        args = self.args
        self.engine = ClusterEngine(etcd_endpoints=args.address, lease_ttl=args.lease_ttl or 5.0,
                                    token=os.environ.get("MESHRAY_TOKEN") if args.address else None,
                                    dir_prefix="meshray-scale-etcd-").start()
        if not args.address and args.etcd_nice:
            # etcd has machines of its own in production; here the simulated
            # nodes share its cores, and an etcd they starve measures the box.
            for pid in self.engine.etcd_pids():
                try:
                    os.setpriority(os.PRIO_PROCESS, pid, args.etcd_nice)
                except PermissionError:
                    self._say(f"--etcd-nice={args.etcd_nice}: not permitted here (needs root "
                              f"below 0); etcd keeps its priority")
            self.result["etcd_nice"] = os.getpriority(os.PRIO_PROCESS, self.engine.etcd_pids()[0])
        for _ in range(args.real_nodes):
            self.real.append(self.engine.start_node(num_cpus=args.real_cpus))
        self._say(f"etcd at {self.engine.address}; {len(self.real)} real node(s) up")

    def join(self) -> None:
        args = self.args
        per_host = args.nodes_per_host
        count = math.ceil(args.nodes / per_host)
        started = time.monotonic()
        for index in range(count):
            size = min(per_host, args.nodes - index * per_host)
            self.hosts.append(HostProcess(args, index, size, self.engine.address,
                                          self.engine.token, self.base_dir))
        want = args.nodes + args.real_nodes
        real = {node.node_id for node in self.real}
        deadline = started + args.join_timeout
        # One deadline for everything: a host still starting its nodes (it
        # reports ready once each has registered or given up) is not waited
        # on alone, and registrations are counted in etcd, so a join that
        # does not finish still says how far it got.
        starting = list(self.hosts)
        while True:
            for host in list(starting):
                try:
                    host.wait_ready(0.05)
                    starting.remove(host)
                except TimeoutError:
                    pass
            try:
                joined = len(self.engine.node_ids() - real)
            except Exception as exc:  # noqa: BLE001 - a busy etcd: count again next round
                self._say(f"cannot count registered nodes yet: {exc}")
                joined = self.result["nodes_joined"] or 0
            statuses = [host.ask({"op": "status"}) for host in self.hosts
                        if host not in starting]
            seeing = sum(1 for status in statuses for node in status["nodes"]
                         if node["view"] >= want)
            self.result["nodes_joined"] = joined
            if not starting and joined == args.nodes and seeing == args.nodes:
                self.result["join_s"] = round(time.monotonic() - started, 3)
                self._note_fan_out(statuses)
                break
            if time.monotonic() > deadline:
                with contextlib.suppress(Exception):   # the last count, given time
                    self.engine.close_view()
                    joined = self.result["nodes_joined"] = len(
                        self.engine.node_ids(timeout=30.0) - real)
                self._say(f"join timed out: {joined}/{args.nodes} registered, "
                          f"{seeing} see all {want} nodes, {len(starting)} host(s) "
                          f"still starting their nodes")
                self.result["nodes_seeing_all"] = seeing
                break
            time.sleep(0.5)
        if self.result["join_s"] is not None:
            self._say(f"joined: {self.result['nodes_joined']}/{args.nodes} in "
                      f"{self.result['join_s']}s")

    def _note_fan_out(self, statuses: list) -> None:
        """What the join cost in deliveries: watch events per node (every
        registration reaches every member; availability only its slice,
        node/avail_slice.py), and how many members' availability a node follows."""
        nodes = [node for status in statuses for node in status["nodes"]]
        self.result["join_watch_events_per_node"] = round(
            sum(node["watch_events"] for node in nodes) / max(1, len(nodes)), 1)
        self.result["avail_slice_bits"] = max(node["avail_bits"] for node in nodes)
        self.result["avail_followed_max"] = max(node["avail_followed"] for node in nodes)

    def _host_totals(self) -> tuple[int, float]:
        """(watch events delivered to live nodes, CPU seconds) summed over the hosts."""
        events, cpu = 0, 0.0
        for host in self.hosts:
            status = host.ask({"op": "status"})
            cpu += status["cpu_s"]
            events += sum(node["watch_events"] for node in status["nodes"] if not node["crashed"])
        return events, cpu

    def idle(self) -> None:
        endpoint = self.engine.address.split(",")[0]
        window = self.args.idle_s
        writes, (events, cpu) = etcd_counter(endpoint), self._host_totals()
        started = time.monotonic()
        time.sleep(window)
        elapsed = time.monotonic() - started
        events_after, cpu_after = self._host_totals()
        writes, events = etcd_counter(endpoint) - writes, events_after - events
        # What a hollow node costs its host doing nothing: its threads' and
        # loops' wakeups, lease refreshes; the share of a core per node.
        self.result["host_cpu_per_node_idle"] = round(
            (cpu_after - cpu) / elapsed / self.args.nodes, 5)
        self.result["etcd_writes_per_s_idle"] = round(writes / elapsed, 3)
        self.result["watch_events_per_node_per_s"] = round(events / elapsed / self.args.nodes, 4)
        self._say(f"idle {elapsed:.1f}s: {writes:.0f} etcd writes, {events} watch events")

    def _drive(self, kind: str, **config) -> tuple[dict, float, float]:
        """Run the `kind` driver (drivers.py) on the real node: (its report,
        seconds the process ran, etcd writes meanwhile)."""
        args = self.args
        endpoint = self.engine.address.split(",")[0]
        env = dict(os.environ, MESHRAY_TOKEN=self.engine.token)
        # gRPC's core logs connection chatter (an idle connection's GOAWAY)
        # at INFO on stderr, which would bury a failing driver's traceback.
        env.setdefault("GRPC_VERBOSITY", "ERROR")
        config.update(address=self.engine.address, timeout=args.task_timeout)
        writes = etcd_counter(endpoint)
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-c", drivers.PROGRAMS[kind], json.dumps(config)],
                              env=env, capture_output=True, text=True,
                              timeout=args.task_timeout + 60)
        elapsed = time.monotonic() - started
        writes = etcd_counter(endpoint) - writes
        if done.returncode != 0:
            said = "\n".join(line for line in done.stderr.splitlines()
                             if not _GRPC_LOG_LINE.match(line))
            raise RuntimeError(f"the {kind} driver failed (status {done.returncode}): "
                               f"{said[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1]), elapsed, writes

    def tasks(self) -> None:
        args = self.args
        report, elapsed, writes = self._drive("tasks", count=args.tasks)
        good, bad, by_node = check_tasks(report["values"], set(self.hollow_ids))
        if bad or good != args.tasks:
            raise RuntimeError(f"{args.tasks - good} of {args.tasks} task results are wrong, "
                               f"e.g. {bad}")
        self.result["many_tasks_per_s"] = round(args.tasks / report["elapsed_s"], 1)
        self.result["many_tasks_checked"] = good
        self.result["etcd_writes_per_s_busy"] = round(writes / elapsed, 3)
        self.result["tasks_by_node"] = {"real": by_node.get("real", 0),
                                        "hollow_nodes_used": len(by_node) - ("real" in by_node),
                                        "hollow_tasks": good - by_node.get("real", 0)}
        self._say(f"{good} task results correct in {report['elapsed_s']:.1f}s; "
                  f"{self.result['tasks_by_node']}")
        self._spill_decisions()

    def actors(self) -> None:
        args = self.args
        report, _elapsed, _writes = self._drive("actors", count=args.actors,
                                                actor_cpus=args.actor_cpus)
        self.result["many_actors_created"] = report["created"]
        if report["created"] != args.actors:
            raise RuntimeError(f"{report['created']} of {args.actors} actors were created "
                               f"({report['failed']} failed, {report['pending']} still pending "
                               f"after {args.task_timeout}s)")
        self.result["many_actors_per_s"] = round(args.actors / report["elapsed_s"], 1)
        self._say(f"{args.actors} actors created in {report['elapsed_s']:.1f}s")
        self._spill_decisions()

    def pgs(self) -> None:
        """Groups created and removed while every change to the reservations
        is recorded; the record is then replayed revision by revision
        (placement/audit.py): no node may ever hold more than it offers."""
        from meshray.placement.audit import AllocRecorder, replay_allocations
        args = self.args
        recorder = AllocRecorder(self.engine.coordinator()).start()
        try:
            report, _elapsed, _writes = self._drive("pgs", count=args.pgs,
                                                    bundles=args.pg_bundles)
            self._settle_allocations()
        finally:
            recorder.stop()
        replay = replay_allocations(recorder.initial, recorder.events)
        self.result.update(many_pgs_created=report["created"],
                           pg_alloc_revisions_replayed=replay.revisions,
                           pg_peak_reserved_bundles=replay.peak_bundles,
                           pg_overcommit_violations=len(replay.violations))
        if replay.violations or replay.unparsed:
            raise RuntimeError(f"placement groups over-committed a node: {replay.violations[:5]}"
                               f" ({len(replay.unparsed)} unreadable records)")
        if report["created"] != args.pgs:
            raise RuntimeError(f"{report['created']} of {args.pgs} placement groups were "
                               f"created within {args.task_timeout}s")
        self.result["many_pgs_per_s"] = round(args.pgs / report["elapsed_s"], 1)
        self._say(f"{args.pgs} groups of {args.pg_bundles} created in "
                  f"{report['elapsed_s']:.1f}s and removed in {report['removed_s']:.1f}s; "
                  f"{replay.revisions} alloc revisions replayed, peak {replay.peak_bundles} "
                  f"bundles, no over-commit")

    def _settle_allocations(self, timeout: float = 60.0) -> None:
        """Wait until every removal reached etcd (no alloc/ record lists a bundle)."""
        from meshray.coordination import keyspace
        from meshray.placement.audit import bundle_demands
        prefix = keyspace.Keyspace().alloc_prefix()
        deadline = time.monotonic() + timeout
        while True:
            items, _rev = self.engine.coordinator().get_prefix(prefix, timeout=10.0)
            held = sum(len(bundle_demands(item.value)) for item in items)
            if not held:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{held} bundles still reserved {timeout:.0f}s after every "
                                   f"group was removed")
            time.sleep(0.5)

    def _spill_decisions(self) -> None:
        """p99 of the real node's placement decisions so far, from its metrics."""
        from prometheus_client.parser import text_string_to_metric_families
        node = self.real[0]
        port = node.info.get("metrics_export_port")
        if not port:
            return
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10.0) as page:
            text = page.read().decode()
        buckets = {}
        for family in text_string_to_metric_families(text):
            if family.name == "meshray_spill_decision_duration_seconds":
                for sample in family.samples:
                    if sample.name.endswith("_bucket"):
                        bound = float(sample.labels["le"])
                        buckets[bound] = buckets.get(bound, 0.0) + sample.value
        p99 = drivers.p99_from_buckets(buckets)
        if p99 is not None:
            self.result["spill_decision_p99_ms"] = round(p99 * 1000.0, 3)
            self.result["spill_decisions"] = int(max(buckets.values()))

    def _kill_and_watch(self, victims: list[str]) -> tuple[list, int]:
        killed = {}
        for host in self.hosts:
            mine = [node for node in victims if node in host.nodes]
            if mine:
                killed.update(host.ask({"op": "crash", "ids": mine,
                                        "close_port": self.args.kill_mode == "crash"})["killed"])
        deadline = time.monotonic() + (self.args.lease_ttl or 5.0) + self.args.detect_grace
        while True:
            deaths = {}
            for host in self.hosts:
                deaths.update(host.ask({"op": "deaths"})["deaths"])
            latencies, missed = detection_latencies(killed, deaths)
            if not missed or time.monotonic() > deadline:
                return latencies, missed
            time.sleep(0.2)

    def detect(self) -> None:
        alive = list(self.hollow_ids)
        one = [self.rng.choice(alive)]
        latencies, missed = self._kill_and_watch(one)
        self.result["detect_p50_s"] = _rounded(percentile(latencies, 50))
        self.result["detect_p99_s"] = _rounded(percentile(latencies, 99))
        rest = [node for node in alive if node not in one]
        many = self.rng.sample(rest, max(1, len(alive) // 10))
        latencies_10, missed_10 = self._kill_and_watch(many)
        self.result["detect_10pct_p50_s"] = _rounded(percentile(latencies_10, 50))
        self.result["detect_10pct_p99_s"] = _rounded(percentile(latencies_10, 99))
        self.result["detect_missed"] = missed + missed_10
        self.result["detect_observations"] = len(latencies) + len(latencies_10)
        self._say(f"detection: 1 kill p99 {self.result['detect_p99_s']}s, {len(many)} kills "
                  f"p99 {self.result['detect_10pct_p99_s']}s, {missed + missed_10} missed")

    def close(self, timeout: float = 120.0) -> None:
        # All hosts stop their nodes at once; one deadline for all of them.
        for host in self.hosts:
            host.begin_close()
        deadline = time.monotonic() + timeout
        for host in self.hosts:
            try:
                host.finish_close(max(1.0, deadline - time.monotonic()))
            except Exception as exc:  # noqa: BLE001 - close the rest
                self._say(f"closing host pid {host.process.pid}: {exc}")
        self._remove_orphaned_stores()
        try:
            if self.engine is not None:
                self.engine.close()
        finally:
            shutil.rmtree(self.base_dir, ignore_errors=True)


    def _remove_orphaned_stores(self) -> None:
        """Store dirs of hollow nodes whose host had to be killed (a host that
        would not stop in time): each is named after its node's session dir
        under our base dir and marked with its host's pid."""
        from meshray.node.node_store import OWNER_FILE, SHM_ROOT
        dead = {str(host.process.pid) for host in self.hosts if host.process.poll() is not None}
        for host_dir in glob.glob(os.path.join(self.base_dir, "host*")):
            for name in os.listdir(host_dir):
                store = os.path.join(SHM_ROOT, f"meshray-{name}")
                try:
                    with open(os.path.join(store, OWNER_FILE)) as handle:
                        owner = handle.read().strip()
                except OSError:
                    continue
                if owner in dead:
                    shutil.rmtree(store, ignore_errors=True)


def _rounded(value):
    return None if value is None else round(value, 3)


def run(args, on_start=None) -> dict:
    """Build the cluster, run the scenarios asked for, tear everything down.

    `on_start(scale_run)`, when given, is called once the ScaleRun exists
    (a test checks afterwards that it left nothing behind)."""
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        raise ValueError(f"--scenarios={args.scenarios!r}: unknown {unknown}; "
                         f"expected a comma-separated subset of {','.join(SCENARIOS)}")
    scale = ScaleRun(args)
    if on_start is not None:
        on_start(scale)
    try:
        scale.start()
        scale.join()
        if scale.result["join_s"] is None:
            # Reported, not raised: how far the join got is the measurement.
            scale.result["error"] = (f"only {scale.result['nodes_joined']} of {args.nodes} "
                                     f"hollow nodes joined within {args.join_timeout}s")
            return scale.result
        for name in ("idle", "tasks", "actors", "pgs", "detect"):
            if name in scenarios:
                try:
                    getattr(scale, name)()
                except Exception as exc:  # noqa: BLE001 - reported with what was measured
                    scale.result["error"] = f"the {name} scenario failed: {exc}"
                    scale._say(scale.result["error"])
                    return scale.result
        scale.result["host_cpu_s"] = round(scale._host_totals()[1], 1)
        return scale.result
    finally:
        scale.close()


def _count(flag: str, minimum: int = 1):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(
                f"{flag}={text!r}: expected a whole number >= {minimum}")
        return value
    return parse


def _amount(flag: str, *, zero_ok: bool = False):
    """A number flag (seconds, CPUs, a rate) that must be > 0 (>= 0 with
    `zero_ok`); anything else is refused naming the flag and the value."""
    return _number(float, flag, zero_ok=zero_ok)


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "scale-test", help="measure a cluster of real and hollow (simulated) nodes",
        description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=_count("--nodes"), default=100,
                        help="hollow nodes (default 100)")
    parser.add_argument("--real-nodes", type=_count("--real-nodes"), default=1,
                        help="real node daemons; the task driver runs on the first (default 1)")
    parser.add_argument("--real-cpus", type=_amount("--real-cpus"), default=1.0,
                        help="CPUs of each real node (default 1: most tasks spill)")
    parser.add_argument("--nodes-per-host", type=_count("--nodes-per-host"), default=50,
                        help="hollow nodes per host process (default 50)")
    parser.add_argument("--cpus", type=_amount("--cpus"), default=64.0,
                        help="CPUs of each hollow node (default 64)")
    parser.add_argument("--task-s", type=_amount("--task-s", zero_ok=True), default=0.0,
                        help="seconds a simulated task runs (default 0)")
    parser.add_argument("--lease-ttl", type=_amount("--lease-ttl"), default=None,
                        help="node lease TTL in seconds (default: the node default, 5)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated, from {','.join(SCENARIOS)} (default all; "
                             "join always runs)")
    parser.add_argument("--tasks", type=_count("--tasks"), default=10_000,
                        help="tasks the driver submits (default 10000)")
    parser.add_argument("--actors", type=_count("--actors"), default=10_000,
                        help="actors the actors driver creates (default 10000)")
    parser.add_argument("--actor-cpus", type=_amount("--actor-cpus"), default=0.2,
                        help="CPUs each of those actors asks for (default 0.2, as Ray's test)")
    parser.add_argument("--pgs", type=_count("--pgs"), default=1000,
                        help="placement groups the pgs driver creates (default 1000)")
    parser.add_argument("--pg-bundles", type=_count("--pg-bundles"), default=3,
                        help="one-CPU bundles in each group (default 3)")
    parser.add_argument("--idle-s", type=_amount("--idle-s"), default=10.0,
                        help="seconds the idle measurement lasts (default 10)")
    parser.add_argument("--join-timeout", type=_amount("--join-timeout"), default=300.0)
    parser.add_argument("--join-rate", type=_amount("--join-rate", zero_ok=True), default=0.0,
                        help="hollow nodes started per second, cluster-wide, spread over the "
                             "hosts (default 0: each host starts its nodes as fast as they "
                             "register, a few at a time)")
    parser.add_argument("--etcd-nice", type=int, default=-10,
                        help="CPU priority (nice) of the etcd member the command starts "
                             "(default -10, so the simulated nodes do not starve it; 0 to "
                             "leave it as is; needs root to go below 0)")
    parser.add_argument("--etcd-connection", choices=ETCD_CONNECTIONS, default="shared",
                        help="shared (default): a host's nodes share one etcd connection, "
                             "each with its own lease and watches; per-node: one each, as "
                             "separate machines would have")
    parser.add_argument("--task-timeout", type=_amount("--task-timeout"), default=600.0)
    parser.add_argument("--detect-grace", type=_amount("--detect-grace", zero_ok=True), default=10.0,
                        help="seconds past the lease TTL to wait for every observer")
    parser.add_argument("--kill-mode", choices=KILL_MODES, default="freeze",
                        help="freeze (default): a killed node's keepalives stop and its port "
                             "stays open, so only its lease's expiry tells; crash: its port "
                             "closes too, and a peer linked to it revokes the lease at once")
    parser.add_argument("--seed", type=int, default=0, help="picks the nodes killed")
    parser.add_argument("--address", default=None,
                        help="etcd endpoints to use instead of starting one (token from "
                             "MESHRAY_TOKEN)")
    parser.add_argument("--json", metavar="FILE", help="write the results here")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(func=run_cli)


def run_cli(args) -> int:
    import signal
    # A SIGTERM (a `timeout` wrapper, say) still tears the cluster down.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    result = run(args)
    print(render_table(result))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2, sort_keys=True)
            out.write("\n")
    if "error" in result:
        print(f"meshray scale-test: {result['error']}", file=sys.stderr)
        return 1
    return 0
