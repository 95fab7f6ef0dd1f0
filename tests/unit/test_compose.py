"""Static checks of docker-compose.yml, the Dockerfile and .dockerignore.

CI has no container engine, so the cluster definition is checked as data:
three etcd members that agree on one initial cluster, node and driver
commands that use only flags `meshray start --help` really offers, the
token secret wired to the flag that reads it, health checks, and an etcd
release outside the 3.5.0-3.5.2 data-inconsistency range.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from urllib.parse import urlsplit

import pytest

yaml = pytest.importorskip("yaml")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ETCD_MEMBERS = ("etcd1", "etcd2", "etcd3")
IMAGE_ROOT = "/opt/meshray/"   # where the Dockerfile puts the checkout's files


@pytest.fixture(scope="module")
def compose() -> dict:
    with open(os.path.join(REPO, "docker-compose.yml")) as handle:
        return yaml.safe_load(handle)


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def start_flags() -> dict[str, bool]:
    """`meshray start` flags -> whether each takes a value, from the real --help."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "meshray.cli.main", "start", "--help"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    usage = out.stdout.split("\n\n", 1)[0]
    flags = {m.group(1): m.group(2) is not None
             for m in re.finditer(r"\[(--[\w-]+)(?: ([^\]]+))?\]", usage)}
    assert "--address" in flags and "--block" in flags, usage
    return flags


def _default(value: str) -> str:
    """Resolve compose `${VAR:-default}` interpolation to its default."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


def _etcd_args(service: dict) -> dict[str, str]:
    command = service["command"]
    assert isinstance(command, list), "etcd command must be exec form (the image has no shell)"
    assert command[0].endswith("etcd")
    args = {}
    for item in command[1:]:
        assert item.startswith("--") and "=" in item, f"use --flag=value form: {item!r}"
        key, value = item.split("=", 1)
        assert key not in args, f"{key} given twice"
        args[key] = value
    return args


def _meshray_start(command) -> list[str]:
    """The `meshray start ...` argument list inside a service command."""
    if isinstance(command, str):
        command = shlex.split(command)
    if command[:2] == ["sh", "-c"]:
        tokens = shlex.split(command[2])
        end = tokens.index("&&") if "&&" in tokens else len(tokens)
        command = tokens[:end]
    assert command[:2] == ["meshray", "start"], f"not a meshray start command: {command}"
    return command[2:]


def _parse_start(args: list[str], flags: dict[str, bool]) -> dict[str, object]:
    parsed: dict[str, object] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, inline = arg.partition("=")
        assert name in flags, f"`meshray start` has no flag {name} (has: {sorted(flags)})"
        if flags[name]:
            if eq:
                value = inline
            else:
                i += 1
                assert i < len(args) and not args[i].startswith("--"), f"{name} needs a value"
                value = args[i]
            parsed[name] = value
        else:
            assert not eq, f"{name} takes no value"
            parsed[name] = True
        i += 1
    return parsed


def _endpoints(text: str) -> set[str]:
    return {e.strip() for e in text.split(",") if e.strip()}


def _healthcheck_ok(service: dict, name: str) -> list:
    check = service.get("healthcheck")
    assert check and not check.get("disable"), f"{name} has no health check"
    test = check["test"]
    assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, test
    return test


# ------------------------------------------------------------------- etcd
def test_three_etcd_members_agree_on_the_initial_cluster(services):
    args = {name: _etcd_args(services[name]) for name in ETCD_MEMBERS}
    clusters = {a["--initial-cluster"] for a in args.values()}
    assert len(clusters) == 1, f"members disagree on --initial-cluster: {clusters}"
    members = dict(item.split("=", 1) for item in clusters.pop().split(","))
    assert set(members) == set(ETCD_MEMBERS)
    assert len({a["--initial-cluster-token"] for a in args.values()}) == 1
    for name, member in args.items():
        assert member["--name"] == name
        assert member["--initial-cluster-state"] == "new"
        assert member["--initial-advertise-peer-urls"] == members[name]
        assert urlsplit(members[name]).hostname == name, "peers must be reachable by name"
        listen_peer = urlsplit(member["--listen-peer-urls"])
        assert listen_peer.port == urlsplit(members[name]).port
        advertised = urlsplit(member["--advertise-client-urls"])
        assert advertised.hostname == name
        assert urlsplit(member["--listen-client-urls"]).port == advertised.port


def test_etcd_members_keep_data_on_their_own_volumes(compose, services):
    sources = []
    for name in ETCD_MEMBERS:
        data_dir = _etcd_args(services[name])["--data-dir"]
        mounts = [v.split(":") for v in services[name].get("volumes", [])]
        match = [source for source, target, *_ in mounts if target == data_dir]
        assert match, f"{name}: --data-dir {data_dir} is not on a volume"
        assert match[0] in (compose.get("volumes") or {}), f"{match[0]} is not a named volume"
        sources.append(match[0])
    assert len(set(sources)) == 3, "each member needs its own data volume"


def test_etcd_release_is_current_and_health_checked(services):
    for name in ETCD_MEMBERS:
        service = services[name]
        image = _default(service["image"])
        tag = image.rsplit(":", 1)[1]
        match = re.fullmatch(r"v?(\d+)\.(\d+)\.(\d+)", tag)
        assert match, f"{name}: pin an exact etcd release, not {tag!r}"
        version = tuple(int(x) for x in match.groups())
        assert version[:2] in ((3, 4), (3, 5)), f"{name}: run a current 3.4/3.5 release"
        assert not ((3, 5, 0) <= version <= (3, 5, 2)), \
            f"{name}: etcd {tag} has the 3.5.0-3.5.2 data-inconsistency bug"
        test = _healthcheck_ok(service, name)
        assert test[0] == "CMD", "the etcd image has no shell: use exec-form CMD"
        assert "endpoint" in test and "health" in test


# ----------------------------------------------------------------- meshray
def test_node_service_scales_and_joins_all_etcd_members(services, start_flags):
    node = services["node"]
    assert "container_name" not in node, "a fixed container name prevents --scale"
    for port in node.get("ports", []):
        assert ":" not in str(port), f"a fixed host port prevents --scale: {port}"
    args = _parse_start(_meshray_start(node["command"]), start_flags)
    assert args.get("--block") is True, "the node's process must stay in the foreground"
    advertised = {urlsplit(_etcd_args(services[n])["--advertise-client-urls"]).netloc
                  for n in ETCD_MEMBERS}
    assert _endpoints(args["--address"]) == advertised
    for member in ETCD_MEMBERS:
        assert node["depends_on"][member]["condition"] == "service_healthy"
    test = _healthcheck_ok(node, "node")
    _assert_image_paths_exist(test)


@pytest.mark.parametrize("service_name", ["node", "driver"])
def test_token_secret_is_wired_to_the_token_flag(compose, services, start_flags, service_name):
    service = services[service_name]
    args = _parse_start(_meshray_start(service["command"]), start_flags)
    host = args.get("--host", "127.0.0.1")
    from meshray.rpc.factory import is_loopback_host
    if not is_loopback_host(host):
        assert "--token-file" in args or "--token" in args, \
            f"{service_name} binds {host} and would be refused without a token"
    assert "--token" not in args, "a token on the command line is visible in `ps`; use a file"
    path = args["--token-file"]
    assert path.startswith("/run/secrets/"), path
    secret = path[len("/run/secrets/"):]
    names = [s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])]
    assert secret in names, f"{service_name} does not mount secret {secret!r}"
    definition = compose["secrets"][secret]
    assert "file" in definition or "environment" in definition
    assert not _default(definition.get("file", "")).startswith("/run")


def test_services_have_room_for_the_object_store(services):
    for name in ("node", "driver"):
        service = services[name]
        size = str(service.get("shm_size", ""))
        match = re.fullmatch(r"(\d+)([kmg]?)b?", size.lower())
        assert match, f"{name}: set shm_size (Docker's default /dev/shm is 64 MiB)"
        scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[match.group(2)]
        assert int(match.group(1)) * scale >= 512 << 20
        assert service.get("init") is True, f"{name}: needs an init to reap orphaned workers"


def test_driver_runs_the_example_job(services, start_flags):
    driver = services["driver"]
    args = _parse_start(_meshray_start(driver["command"]), start_flags)
    assert float(args.get("--num-cpus", 1)) == 0, "the driver's node should not take work"
    assert "--block" not in args, "the driver's node must go to the background"
    env = driver["environment"]
    assert _endpoints(env["MESHRAY_ADDRESS"]) == _endpoints(args["--address"])
    assert driver["depends_on"]["node"]["condition"] == "service_healthy"
    script = driver["command"][2].split("&&", 1)[1].split()
    _assert_image_paths_exist(script)
    assert any(s.endswith("examples/cluster_job.py") for s in script)


def _assert_image_paths_exist(tokens) -> None:
    """Paths under /opt/meshray/ in the image must exist in the checkout."""
    for token in tokens:
        if isinstance(token, str) and token.startswith(IMAGE_ROOT):
            local = os.path.join(REPO, token[len(IMAGE_ROOT):])
            assert os.path.exists(local), f"{token} is not in the checkout ({local})"


# ------------------------------------------------------------------- image
def test_dockerfile_builds_from_the_checkout():
    with open(os.path.join(REPO, "Dockerfile")) as handle:
        text = handle.read()
    instructions = [line.split(None, 1) for line in text.splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
    first = next(i for i in instructions if i[0].upper() == "FROM")
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", first[1].strip()), first
    assert re.search(r"^COPY meshray \./meshray$", text, re.M)
    assert re.search(r"^RUN pip install \.$", text, re.M), "install meshray from the checkout"
    for path in ("examples", "scripts"):
        assert re.search(rf"^COPY {path} ", text, re.M), f"image lacks {path}/"
    users = [i[1].strip() for i in instructions if i[0].upper() == "USER"]
    assert users and users[-1] not in ("root", "0"), "run as a non-root user"
    assert "find_etcd_binary" in text, "the image should report its bundled etcd"


def test_dockerignore_keeps_secrets_out_of_the_image():
    with open(os.path.join(REPO, ".dockerignore")) as handle:
        patterns = {line.strip() for line in handle if line.strip() and not line.startswith("#")}
    for required in (".git", "secrets", "certs", "**/*.pem"):
        assert required in patterns, f".dockerignore must exclude {required}"
    for needed in ("meshray", "chaos", "pyproject.toml", "README.md", "examples", "scripts"):
        assert needed not in patterns, f".dockerignore excludes {needed}, which the build copies"
