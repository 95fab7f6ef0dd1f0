"""The compose topology in real containers, with podman, on this machine.

Builds a Debian base image with debootstrap (no registry needed), a meshray
image from it and this checkout's wheels, then starts 3 etcd members and 3
meshray nodes -- one container each, on a private podman network, with a
cluster token -- and checks that the cluster works and survives faults:

1. a job submitted from the host to node 1's jobs API spreads over the 3
   nodes, moves an 8 MiB object between them and calls an actor
   (examples/cluster_job.py, uploaded as the job's working_dir);
2. `podman kill` (SIGKILL) of node 3's container and of the etcd leader's;
3. the survivors see node 3 DEAD (their HTTP API and `meshray status`),
   etcd elects a new leader, the first job's record is still there, and a
   job submitted to node 2 spreads over the 2 surviving nodes.

Everything it started -- containers, network, volumes -- is removed on exit,
failure or Ctrl-C included; the two images are kept as a cache (reused when
the base's package list, or the checkout, is unchanged).

    sudo python deploy/podman/run_cluster.py            # build what is missing, run, tear down
    sudo python deploy/podman/run_cluster.py --build-only
    sudo python deploy/podman/run_cluster.py --teardown mrpodXXXXXX   # after a SIGKILLed run
    sudo python deploy/podman/run_cluster.py --remove-images

It installs nothing. It needs root (debootstrap; and the host must reach the
containers' addresses, which rootless podman does not give), podman with
runc and catatonit, and debootstrap; the podman settings it needs are in its own
containers.conf (CONTAINERS_CONF), so the system's is left alone. Exit
codes: 0 every check passed, 1 a check failed, 77 this machine cannot run
it (the reason, and how to fix it, on stderr).
"""
from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CONTAINERFILE = os.path.join(HERE, "Containerfile")

SKIP = 77
# catatonit is podman's --init (PID 1 that reaps orphaned workers, like
# compose's `init: true`); Debian's podman only recommends it.
TOOLS = ("podman", "runc", "debootstrap", "catatonit")
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-venv", "etcd-server", "etcd-client")
BASE_REPO = "localhost/meshray-base"
IMAGE = "localhost/meshray-podman:latest"
LABEL = "io.meshray.podman"            # on every container, network and volume of a run
CONTEXT_LABEL = "io.meshray.context"   # on the image: hash of what it was built from
ETCD_MEMBERS = 3
NODES = 3
NODE_PORT = 7700
JOBS_PORT = 8265
MEMBER_OCTET, NODE_OCTET = 11, 21      # etcd<i> at .11+i-1, node<i> at .21+i-1
# Overrides of podman's defaults that this kind of host needs: crun refuses
# hybrid cgroups, and default ulimits above the hard limit need
# CAP_SYS_RESOURCE, which a container host (this one is one) may not have.
CONTAINERS_CONF = """\
[containers]
default_ulimits = []

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
"""
INSTALL_HINT = ("as root on Debian/Ubuntu: apt-get install podman runc debootstrap catatonit "
                "(no other setup: this script brings its own containers.conf)")


class CannotRun(Exception):
    """This machine lacks something the run needs (exit 77, not a failure)."""


class CheckFailed(Exception):
    """The cluster did not do what it should (exit 1)."""


def say(text: str) -> None:
    print(text, flush=True)


# ------------------------------------------------------------------ pure decisions
def missing_tools(which=shutil.which) -> list[str]:
    """The required commands that are not on PATH (sbin included)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [tool for tool in TOOLS if which(tool, path=path) is None]


def base_tag(packages=BASE_PACKAGES, suite: str = SUITE) -> str:
    """The base image's tag: its suite and a hash of its package list, so a
    changed list builds a new base instead of reusing a stale one."""
    digest = hashlib.sha256(" ".join(sorted(packages)).encode()).hexdigest()[:10]
    return f"{BASE_REPO}:{suite}-{digest}"


def manylinux_platforms(glibc: str, machine: str) -> list[str]:
    """pip --platform values for a glibc: pip does not widen a custom
    manylinux_2_X to older glibc releases, so every one is named."""
    major, minor = (int(part) for part in glibc.split(".")[:2])
    if major != 2 or minor < 17:
        raise CannotRun(f"glibc {glibc} in the base image: expected 2.17 or later")
    tags = [f"manylinux_2_{m}_{machine}" for m in range(minor, 16, -1)]
    return tags + [f"manylinux2014_{machine}", f"linux_{machine}"]


def member_addresses(subnet: str, count: int, first_octet: int) -> list[str]:
    """Fixed addresses in the run's network, so etcd's --initial-cluster and
    the nodes' --address can be written before anything starts (no DNS)."""
    network = ipaddress.ip_network(subnet)
    if network.num_addresses < 256:
        raise CheckFailed(f"podman gave the network {subnet}; expected a /24 or larger")
    return [str(network.network_address + first_octet + i) for i in range(count)]


def etcd_leader(statuses: list[dict]) -> str | None:
    """The endpoint of the member that leads, from `etcdctl endpoint status -w json`."""
    for entry in statuses:
        status = entry.get("Status") or {}
        member = (status.get("header") or {}).get("member_id")
        if member and member == status.get("leader"):
            return entry.get("Endpoint")
    return None


def context_hash(paths: list[str], extra: str) -> str:
    """Hash of the files an image is built from (plus `extra`), for caching."""
    digest = hashlib.sha256(extra.encode())
    for root in paths:
        files = [root] if os.path.isfile(root) else sorted(
            os.path.join(d, f) for d, dirs, names in os.walk(root)
            if "__pycache__" not in d for f in names if not f.endswith(".pyc"))
        for name in files:
            digest.update(os.path.relpath(name, REPO).encode() + b"\0")
            with open(name, "rb") as handle:
                digest.update(hashlib.sha256(handle.read()).digest())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------ podman
class Podman:
    """podman with this script's own containers.conf; every call has a deadline."""

    def __init__(self, workdir: str):
        conf = os.path.join(workdir, "containers.conf")
        with open(conf, "w") as handle:
            handle.write(CONTAINERS_CONF)
        self.env = dict(os.environ, CONTAINERS_CONF=conf)

    def run(self, *args: str, timeout: float = 60, check: bool = True,
            stdin=None) -> subprocess.CompletedProcess:
        try:
            result = subprocess.run(["podman", *args], capture_output=True, text=True,
                                    env=self.env, timeout=timeout, stdin=stdin)
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"`podman {' '.join(args[:3])} ...` took over {timeout:.0f} s") \
                from None
        if check and result.returncode != 0:
            raise CheckFailed(f"`podman {' '.join(args)}` exited {result.returncode}: "
                              f"{result.stderr.strip()[-2000:]}")
        return result

    def out(self, *args: str, timeout: float = 60) -> str:
        return self.run(*args, timeout=timeout).stdout.strip()

    def exists(self, image: str) -> bool:
        return self.run("image", "exists", image, check=False).returncode == 0

    def label_of(self, image: str, label: str) -> str | None:
        if not self.exists(image):
            return None
        labels = json.loads(self.out("image", "inspect", "--format", "{{json .Labels}}", image))
        return (labels or {}).get(label)


# ------------------------------------------------------------------ images
def _mounts_under(path: str) -> list[str]:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as handle:
        points = [line.split()[4] for line in handle]
    return [p for p in points if p == real or p.startswith(real + "/")]


def _remove_rootfs(root: str) -> None:
    """Delete a debootstrap target -- never through a mount debootstrap left
    behind (its /proc or a bound /dev would take the host's with it)."""
    for point in sorted(_mounts_under(root), key=len, reverse=True):
        subprocess.run(["umount", "--lazy", point], capture_output=True, timeout=30)
    left = _mounts_under(root)
    if left:
        raise CheckFailed(f"not deleting {root}: still mounted: {left}; unmount them and "
                          f"remove it by hand")
    shutil.rmtree(root)


def build_base(podman: Podman, workdir: str, mirror: str, rebuild: bool) -> tuple[str, str]:
    """The debootstrap base image: (tag, 'cached' or 'built in N s')."""
    tag = base_tag()
    if podman.exists(tag) and not rebuild:
        return tag, "cached"
    started = time.monotonic()
    root = os.path.join(workdir, "rootfs")
    say(f"debootstrap --variant=minbase {SUITE} from {mirror} (a few minutes) ...")
    try:
        result = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
             SUITE, root, mirror], capture_output=True, text=True, timeout=1200)
        if result.returncode != 0:
            raise CheckFailed(f"debootstrap exited {result.returncode}: "
                              f"{(result.stdout + result.stderr).strip()[-2000:]}")
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for name in os.listdir(os.path.join(root, junk)):
                path = os.path.join(root, junk, name)
                if os.path.isfile(path):
                    os.unlink(path)
        tarball = os.path.join(workdir, "rootfs.tar")
        subprocess.run(["tar", "--numeric-owner", "-C", root, "-cf", tarball, "."],
                       check=True, capture_output=True, timeout=600)
        podman.run("import", "--change", "CMD [\"/bin/bash\"]", "--message",
                   f"debootstrap --variant=minbase {SUITE} + {' '.join(BASE_PACKAGES)}",
                   tarball, tag, timeout=600)
        os.unlink(tarball)
    finally:
        if os.path.exists(root):
            _remove_rootfs(root)
    return tag, f"built in {time.monotonic() - started:.0f} s"


def probe(podman: Podman, base: str) -> tuple[str, str]:
    """Start one throwaway container: (python X.Y, glibc) of the base, or
    CannotRun with podman's own error when containers cannot start here."""
    script = ("import platform, sys; "
              "print(f'{sys.version_info[0]}.{sys.version_info[1]}', platform.libc_ver()[1])")
    result = podman.run("run", "--rm", "--network", "none", base, "python3", "-c", script,
                        timeout=120, check=False)
    if result.returncode != 0:
        raise CannotRun(f"a container cannot start here: `podman run --rm {base} python3` "
                        f"exited {result.returncode}: {result.stderr.strip()[-1500:]}")
    python, glibc = result.stdout.split()
    return python, glibc


def build_image(podman: Podman, workdir: str, base: str, rebuild: bool) -> tuple[str, str]:
    """The meshray image from `base` and this checkout: (image, 'cached'/'built in N s')."""
    health = os.path.join(REPO, "scripts", "node_health.py")
    sources = [os.path.join(REPO, p) for p in ("meshray", "chaos", "pyproject.toml", "README.md")]
    wanted = context_hash(sources + [CONTAINERFILE, health], base)
    if podman.label_of(IMAGE, CONTEXT_LABEL) == wanted and not rebuild:
        return IMAGE, "cached"
    started = time.monotonic()
    python, glibc = probe(podman, base)
    context = os.path.join(workdir, "context")
    wheels = os.path.join(context, "wheels")
    os.makedirs(wheels)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run_host(pip + ["wheel", "--no-deps", "--wheel-dir", wheels, REPO], "pip wheel", 600)
    meshray_wheel = [os.path.join(wheels, n) for n in os.listdir(wheels)]
    platforms = [arg for tag in manylinux_platforms(glibc, platform.machine())
                 for arg in ("--platform", tag)]
    _run_host(pip + ["download", "--dest", wheels, "--only-binary=:all:",
                     "--python-version", python, "--implementation", "cp",
                     "--abi", "cp" + python.replace(".", ""), *platforms, *meshray_wheel],
              "pip download", 900)
    shutil.copy(CONTAINERFILE, os.path.join(context, "Containerfile"))
    shutil.copy(health, os.path.join(context, "node_health.py"))
    old = podman.run("image", "inspect", "--format", "{{.Id}}", IMAGE, check=False).stdout.strip()
    podman.run("build", "--network", "none", "--pull=never", "--build-arg", f"BASE={base}",
               "--label", f"{CONTEXT_LABEL}={wanted}", "--tag", IMAGE, "--file",
               os.path.join(context, "Containerfile"), context, timeout=900)
    shutil.rmtree(context)
    if old:   # the superseded build: keep one meshray image, not one per checkout
        podman.run("rmi", old, check=False)
    return IMAGE, f"built in {time.monotonic() - started:.0f} s"


def _run_host(argv: list[str], what: str, timeout: float) -> None:
    env = dict(os.environ, PIP_NO_INPUT="1")
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"{what} took over {timeout:.0f} s") from None
    if result.returncode != 0:
        raise CheckFailed(f"{what} exited {result.returncode}: "
                          f"{(result.stdout + result.stderr).strip()[-2000:]}")


# ------------------------------------------------------------------ the cluster
class PodCluster:
    """One run's containers, network and volumes, all labelled `LABEL=prefix`."""

    def __init__(self, podman: Podman, image: str, prefix: str, workdir: str):
        self.podman, self.image, self.prefix = podman, image, prefix
        self.network = f"{prefix}-net"
        self.token = secrets.token_urlsafe(32)
        self.token_file = os.path.join(workdir, "meshray_token")
        with open(os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400),
                  "w") as handle:
            handle.write(self.token + "\n")
        os.chown(self.token_file, 1000, 1000)    # the image's meshray user reads it
        self.etcd_ips: list[str] = []
        self.node_ips: list[str] = []

    def name(self, kind: str, index: int) -> str:
        return f"{self.prefix}-{kind}{index}"

    def _run(self, name: str, ip: str, *args: str) -> None:
        self.podman.run("run", "--detach", "--name", name, "--hostname", name.split("-")[-1],
                        "--label", f"{LABEL}={self.prefix}", "--network", self.network,
                        "--ip", ip, "--init", *args, timeout=120)

    def start(self) -> None:
        self.podman.run("network", "create", "--disable-dns", "--label",
                        f"{LABEL}={self.prefix}", self.network)
        info = json.loads(self.podman.out("network", "inspect", self.network))
        subnet = info[0]["subnets"][0]["subnet"]
        self.etcd_ips = member_addresses(subnet, ETCD_MEMBERS, MEMBER_OCTET)
        self.node_ips = member_addresses(subnet, NODES, NODE_OCTET)
        say(f"network {self.network}: {subnet}")
        cluster = ",".join(f"etcd{i + 1}=http://{ip}:2380" for i, ip in enumerate(self.etcd_ips))
        for i, ip in enumerate(self.etcd_ips, start=1):
            volume = f"{self.name('etcd', i)}-data"
            self.podman.run("volume", "create", "--label", f"{LABEL}={self.prefix}", volume)
            # etcd needs no root: `nobody`, its volume chowned to it (:U).
            self._run(self.name("etcd", i), ip, "--user", "nobody",
                      "--volume", f"{volume}:/etcd-data:U", self.image,
                      "/usr/bin/etcd", f"--name=etcd{i}", "--data-dir=/etcd-data",
                      "--listen-client-urls=http://0.0.0.0:2379",
                      f"--advertise-client-urls=http://{ip}:2379",
                      "--listen-peer-urls=http://0.0.0.0:2380",
                      f"--initial-advertise-peer-urls=http://{ip}:2380",
                      f"--initial-cluster={cluster}", "--initial-cluster-state=new",
                      f"--initial-cluster-token={self.prefix}",
                      "--auto-compaction-mode=revision", "--auto-compaction-retention=10000")
        self.wait_etcd(self.etcd_ips, 90)
        say("etcd members: " + ", ".join(f"{ip}:2379" for ip in self.etcd_ips))
        address = ",".join(f"{ip}:2379" for ip in self.etcd_ips)
        for i, ip in enumerate(self.node_ips, start=1):
            self._run(self.name("node", i), ip, "--shm-size", "1g",
                      "--volume", f"{self.token_file}:/run/secrets/meshray_token:ro",
                      self.image, "meshray", "start", "--address", address,
                      "--host", "0.0.0.0", "--port", str(NODE_PORT),
                      "--data-port", str(NODE_PORT + 1), "--dashboard-port", str(JOBS_PORT), "--object-store-memory",
                      str(256 * 1024 * 1024),
                      "--token-file", "/run/secrets/meshray_token", "--block")

    # ---------------------------------------------------------------- etcd
    def etcdctl(self, via: int, endpoints: list[str], *args: str) -> str:
        urls = ",".join(f"http://{ip}:2379" for ip in endpoints)
        return self.podman.out("exec", "--env", "ETCDCTL_API=3", self.name("etcd", via),
                               "/usr/bin/etcdctl", "--command-timeout=5s",
                               f"--endpoints={urls}", *args, timeout=30)

    def etcd_statuses(self, via: int, endpoints: list[str]) -> list[dict]:
        return json.loads(self.etcdctl(via, endpoints, "endpoint", "status", "-w", "json"))

    def wait_etcd(self, endpoints: list[str], timeout: float) -> None:
        via = self.etcd_ips.index(endpoints[0]) + 1
        deadline, last = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            try:
                self.etcdctl(via, endpoints, "endpoint", "health")
                if etcd_leader(self.etcd_statuses(via, endpoints)):
                    return
                last = "no leader yet"
            except CheckFailed as exc:
                last = str(exc)
            time.sleep(1.0)
        raise CheckFailed(f"etcd at {endpoints} not healthy within {timeout:.0f} s: {last}")

    # ---------------------------------------------------------------- nodes
    def node_id(self, index: int) -> str:
        out = self.podman.out("exec", self.name("node", index), "python",
                              "/opt/meshray/scripts/node_health.py", timeout=30)
        return out.split()[-1]

    def wait_nodes(self, timeout: float) -> dict[int, str]:
        """Node ids by index, once every node's daemon answers its health check."""
        ids, deadline, last = {}, time.monotonic() + timeout, ""
        while len(ids) < NODES and time.monotonic() < deadline:
            for index in range(1, NODES + 1):
                if index not in ids:
                    try:
                        ids[index] = self.node_id(index)
                    except CheckFailed as exc:
                        last = str(exc)
            time.sleep(0.5 if len(ids) < NODES else 0)
        if len(ids) < NODES:
            raise CheckFailed(f"nodes {sorted(set(range(1, NODES + 1)) - set(ids))} not "
                              f"healthy within {timeout:.0f} s: {last}\n{self.logs_tail()}")
        return ids

    def api(self, ip: str, path: str) -> dict:
        request = urllib.request.Request(f"http://{ip}:{JOBS_PORT}{path}",
                                         headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def node_states(self, ip: str) -> dict[str, tuple[str, str]]:
        """node id -> (state, address), as the node at `ip` sees the cluster."""
        rows = self.api(ip, "/api/v0/nodes")["items"]
        return {row["node_id"]: (row["state"], row["address"]) for row in rows}

    def wait_states(self, ip: str, want, what: str, timeout: float) -> dict:
        deadline, states = time.monotonic() + timeout, {}
        while time.monotonic() < deadline:
            try:
                states = self.node_states(ip)
            except OSError as exc:
                states = {"error": (str(exc), "")}
            if want(states):
                return states
            time.sleep(0.5)
        raise CheckFailed(f"node {ip} never saw {what} within {timeout:.0f} s; it sees {states}")

    def submit(self, ip: str, job_id: str, expect_nodes: int) -> str:
        """`meshray job submit` from the host to the node at `ip`; its output."""
        env = dict(os.environ, PYTHONPATH=REPO, MESHRAY_TOKEN_FILE=self.token_file)
        env.pop("MESHRAY_TOKEN", None)
        runtime_env = {"env_vars": {"MESHRAY_EXPECT_NODES": str(expect_nodes),
                                    "MESHRAY_WAIT_NODES_S": "60"}}
        argv = [sys.executable, "-m", "meshray.cli.main", "job", "submit",
                "--address", f"http://{ip}:{JOBS_PORT}", "--submission-id", job_id,
                "--working-dir", os.path.join(REPO, "examples"),
                "--runtime-env-json", json.dumps(runtime_env), "--", "python", "cluster_job.py"]
        try:
            result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=240)
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"job {job_id} did not finish within 240 s") from None
        out = result.stdout + result.stderr
        for line in out.strip().splitlines():
            say(f"  | {line}")
        if result.returncode != 0 or f"Job '{job_id}' succeeded" not in out \
                or f"{expect_nodes} worker node(s)" not in out or "\nOK" not in out:
            raise CheckFailed(f"job {job_id} via {ip} did not succeed on {expect_nodes} nodes "
                              f"(exit {result.returncode})\n{self.logs_tail()}")
        return out

    def logs_tail(self) -> str:
        parts = []
        for index in range(1, NODES + 1):
            result = self.podman.run("logs", "--tail", "15", self.name("node", index),
                                     check=False)
            parts.append(f"--- {self.name('node', index)}:\n{result.stdout}{result.stderr}")
        return "\n".join(parts)


def teardown(podman: Podman, prefix: str) -> list[str]:
    """Remove every container, network and volume labelled with `prefix`;
    return what is still there afterwards (empty when all went)."""
    label = f"label={LABEL}={prefix}"
    containers = podman.out("ps", "--all", "--quiet", "--filter", label).split()
    if containers:
        podman.run("rm", "--force", "--time", "0", *containers, timeout=120, check=False)
    for network in podman.out("network", "ls", "--quiet", "--filter", label).split():
        podman.run("network", "rm", "--force", network, check=False)
    for volume in podman.out("volume", "ls", "--quiet", "--filter", label).split():
        podman.run("volume", "rm", "--force", volume, check=False)
    return (podman.out("ps", "--all", "--quiet", "--filter", label).split()
            + podman.out("network", "ls", "--quiet", "--filter", label).split()
            + podman.out("volume", "ls", "--quiet", "--filter", label).split())


# ------------------------------------------------------------------ the scenario
def scenario(cluster: PodCluster) -> None:
    started = time.monotonic()
    cluster.start()
    ids = cluster.wait_nodes(180)
    say("nodes: " + ", ".join(f"node{i} {ids[i][:12]}@{cluster.node_ips[i - 1]}" for i in ids))
    first, second = cluster.node_ips[0], cluster.node_ips[1]
    states = cluster.wait_states(
        first, lambda s: sum(state == "ALIVE" for state, _a in s.values()) == NODES,
        f"{NODES} alive nodes", 60)
    advertised = sorted(address.rsplit(":", 1)[0] for _s, address in states.values())
    say("node addresses seen by node1: " + ", ".join(advertised))
    if advertised != sorted(cluster.node_ips):
        raise CheckFailed(f"nodes advertise {advertised}, not their container addresses "
                          f"{sorted(cluster.node_ips)}")
    say(f"cluster up in {time.monotonic() - started:.0f} s")

    before = f"{cluster.prefix}-before"
    say(f"job {before}: meshray job submit --address http://{first}:{JOBS_PORT} "
        f"--working-dir examples -- python cluster_job.py")
    cluster.submit(first, before, NODES)
    say(f"job {before}: SUCCEEDED on {NODES} nodes")

    victim = NODES
    say(f"fault: podman kill {cluster.name('node', victim)} (node {ids[victim][:12]}, SIGKILL)")
    cluster.podman.run("kill", cluster.name("node", victim))
    statuses = cluster.etcd_statuses(1, cluster.etcd_ips)
    leader_url = etcd_leader(statuses)
    if leader_url is None:
        raise CheckFailed(f"no etcd leader in {statuses}")
    leader = next(i for i, ip in enumerate(cluster.etcd_ips, 1) if f"//{ip}:" in leader_url)
    say(f"fault: podman kill {cluster.name('etcd', leader)} (the etcd leader, {leader_url})")
    cluster.podman.run("kill", cluster.name("etcd", leader))
    survivors = [ip for i, ip in enumerate(cluster.etcd_ips, 1) if i != leader]
    cluster.wait_etcd(survivors, 60)
    new_leader = etcd_leader(cluster.etcd_statuses(cluster.etcd_ips.index(survivors[0]) + 1,
                                                   survivors))
    say(f"etcd: new leader {new_leader}")

    dead = ids[victim]
    for ip in (first, second):
        cluster.wait_states(ip, lambda s: s.get(dead, ("", ""))[0] == "DEAD"
                            and sum(st == "ALIVE" for st, _a in s.values()) == NODES - 1,
                            f"node {dead[:12]} DEAD and {NODES - 1} alive", 90)
    say(f"node {dead[:12]} is DEAD as seen by node1 and node2 (GET /api/v0/nodes)")
    status = cluster.podman.out("exec", cluster.name("node", 1), "meshray", "status",
                                timeout=60)
    row = next((line for line in status.splitlines() if line.startswith(dead)), "")
    if "DEAD" not in row.split():
        raise CheckFailed(f"`meshray status` on node1 does not show {dead} DEAD:\n{status}")
    say(f"meshray status on node1: {row.split()[0][:12]} {row.split()[1]}")

    record = cluster.api(second, f"/api/jobs/{before}")
    if record.get("status") != "SUCCEEDED":
        raise CheckFailed(f"job {before} as node2 sees it after the faults: {record}")
    say(f"job {before} as node2 sees it after the faults: {record['status']}")
    after = f"{cluster.prefix}-after"
    say(f"job {after}: submitted to node2 after the faults")
    cluster.submit(second, after, NODES - 1)
    say(f"job {after}: SUCCEEDED on {NODES - 1} nodes")


def run(args) -> int:
    timings: dict[str, float] = {}
    workdir = tempfile.mkdtemp(prefix="meshray-podman-")
    prefix = args.prefix or f"mrpod{secrets.token_hex(3)}"
    podman = None
    status = 1
    try:
        podman = Podman(workdir)
        clock = time.monotonic()
        base, how = build_base(podman, workdir, args.mirror, args.rebuild_base)
        timings["base"] = time.monotonic() - clock
        say(f"base image: {base} ({how})")
        clock = time.monotonic()
        image, how = build_image(podman, workdir, base, args.rebuild_image)
        timings["image"] = time.monotonic() - clock
        say(f"meshray image: {image} ({how})")
        if args.build_only:
            status = 0
            return status
        probe(podman, image)      # a cached image skips the build's probe
        say(f"prefix: {prefix}")
        clock = time.monotonic()
        try:
            scenario(PodCluster(podman, image, prefix, workdir))
        finally:
            timings["cluster"] = time.monotonic() - clock
        status = 0
    except CannotRun as exc:
        print(f"cannot run here: {exc}", file=sys.stderr, flush=True)
        status = SKIP
    except CheckFailed as exc:
        say(f"check failed: {exc}")
    finally:
        if podman is not None and not args.build_only:
            left = teardown(podman, prefix)
            if left:
                say(f"NOT torn down, still there: {left}")
                status = status or 1
            else:
                say("torn down (containers, network, volumes; images kept as a cache)")
        shutil.rmtree(workdir, ignore_errors=True)
        if timings:
            say("timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
        if status != SKIP:
            say("OK" if status == 0 else "FAIL")
    return status


def _sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirror", default=MIRROR, help=f"Debian mirror (default {MIRROR})")
    parser.add_argument("--build-only", action="store_true", help="build the images and stop")
    parser.add_argument("--rebuild-base", action="store_true",
                        help="debootstrap again even if the base image exists")
    parser.add_argument("--rebuild-image", action="store_true",
                        help="build the meshray image even if it matches the checkout")
    parser.add_argument("--prefix", help="name prefix and label of this run's resources "
                        "(default: mrpod + 6 random hex digits)")
    parser.add_argument("--teardown", metavar="PREFIX",
                        help="only remove the containers, network and volumes of PREFIX")
    parser.add_argument("--remove-images", action="store_true",
                        help="only remove the cached base and meshray images")
    args = parser.parse_args(argv)
    if args.prefix is not None and not (args.prefix.isalnum() and args.prefix.isascii()):
        parser.error(f"--prefix={args.prefix!r}: expected letters and digits only")
    missing = missing_tools()
    if missing:
        print(f"cannot run here: missing {', '.join(missing)}; install them {INSTALL_HINT}",
              file=sys.stderr)
        return SKIP
    if os.geteuid() != 0:
        print("cannot run here: needs root (debootstrap, and rootful podman so that the host "
              "reaches the containers' addresses)", file=sys.stderr)
        return SKIP
    signal.signal(signal.SIGTERM, _sigterm)
    if args.teardown or args.remove_images:
        workdir = tempfile.mkdtemp(prefix="meshray-podman-")
        try:
            podman = Podman(workdir)
            if args.remove_images:
                for image in (IMAGE, base_tag()):
                    podman.run("rmi", "--force", image, check=False)
                return 0
            left = teardown(podman, args.teardown)
            say(f"still there: {left}" if left else "torn down")
            return 1 if left else 0
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
