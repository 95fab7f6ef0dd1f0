"""deploy/kubernetes, checked offline: every resource against the Kubernetes
API schema (kubernetes-validate, strict: unknown fields are errors), the
ServiceMonitor against a bundled minimal schema of its CRD, and the wiring
between them (ports, selectors, probe paths, command lines meshray parses).

Rendered with `kubectl kustomize` where kubectl is installed; elsewhere the
kustomizations are followed by hand (resources and components only: the
manifests use no patches, so both give the same objects, which the test
checks where it can).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import yaml

from tests.helpers import REPO

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="pip install -e '.[test]' installs kubernetes-validate")

K8S_VERSION = "1.33.0"
ROOT = os.path.join(REPO, "deploy", "kubernetes")
BASE = os.path.join(ROOT, "base")
MONITORING = os.path.join(ROOT, "overlays", "monitoring")

# The parts of the Prometheus operator's ServiceMonitor CRD the manifests
# use, closed (additionalProperties: false) so a typo is an error.
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"],
                     "properties": {"name": {"type": "string"},
                                    "labels": {"type": "object"}}},
        "spec": {
            "type": "object", "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "additionalProperties": False,
                             "properties": {"matchLabels": {
                                 "type": "object",
                                 "additionalProperties": {"type": "string"}}}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "port": {"type": "string"},
                        "path": {"type": "string", "pattern": "^/"},
                        "interval": {"type": "string",
                                     "pattern": "^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?)$"},
                        "scheme": {"enum": ["http", "https"]},
                    }}},
            },
        },
    },
}


def _by_hand(directory: str) -> list[dict]:
    """A kustomization's resources and components' resources, in order."""
    with open(os.path.join(directory, "kustomization.yaml")) as handle:
        kustomization = yaml.safe_load(handle)
    unsupported = set(kustomization) - {"apiVersion", "kind", "resources", "components",
                                        "images"}
    assert not unsupported, f"{directory}: render by hand cannot follow {unsupported}"
    out = []
    for entry in kustomization.get("resources", []) + kustomization.get("components", []):
        path = os.path.normpath(os.path.join(directory, entry))
        if os.path.isdir(path):
            out += _by_hand(path)
        else:
            with open(path) as handle:
                out += [doc for doc in yaml.safe_load_all(handle) if doc]
    for image in kustomization.get("images", []):
        for container in _containers(out):
            name, _, _tag = container["image"].partition(":")
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    return out


def _kubectl(directory: str) -> list[dict] | None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    rendered = subprocess.run([kubectl, "kustomize", directory], capture_output=True,
                              text=True, timeout=120, check=True).stdout
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


def _render(directory: str) -> list[dict]:
    return _kubectl(directory) or _by_hand(directory)


def _containers(objects: list[dict]) -> list[dict]:
    out = []
    for obj in objects:
        spec = obj.get("spec", {}).get("template", {}).get("spec", {})
        out += spec.get("containers", [])
    return out


def _one(objects, kind, name) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, got {len(found)}"
    return found[0]


def _pod_template(objects, name) -> dict:
    return _one(objects, "StatefulSet", name)["spec"]["template"]


@pytest.fixture(scope="module")
def base():
    return _render(BASE)


@pytest.fixture(scope="module")
def monitoring():
    return _render(MONITORING)


def test_every_base_resource_is_valid_for_kubernetes(base):
    kinds = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in base)
    assert kinds == sorted([
        "Service/etcd", "StatefulSet/etcd", "PodDisruptionBudget/etcd",
        "Job/meshray-etcd-auth", "StatefulSet/meshray-node", "PodDisruptionBudget/meshray-node",
        "Service/meshray-dashboard", "Service/meshray-metrics", "Service/meshray-node"])
    for obj in base:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_a_typo_is_caught_by_the_strict_schema(base):
    broken = yaml.safe_load(yaml.safe_dump(_one(base, "StatefulSet", "meshray-node")))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_the_service_monitor_is_only_in_the_optional_component(base, monitoring):
    import jsonschema
    assert not [o for o in base if o["apiVersion"].startswith("monitoring.coreos.com")]
    monitor = _one(monitoring, "ServiceMonitor", "meshray")
    jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)
    metrics = _one(monitoring, "Service", "meshray-metrics")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= \
        metrics["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= \
        {p["name"] for p in metrics["spec"]["ports"]}
    for obj in monitoring:
        if obj["kind"] != "ServiceMonitor":
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_rendering_by_hand_gives_what_kubectl_gives():
    for directory in (BASE, MONITORING):
        rendered = _kubectl(directory)
        if rendered is None:
            pytest.skip("kubectl is not installed")
        def key(obj):     # kubectl orders by kind; the objects must be equal
            return obj["kind"], obj["metadata"]["name"]
        assert sorted(rendered, key=key) == sorted(_by_hand(directory), key=key)


def test_services_and_budgets_select_the_pods_and_name_their_ports(base):
    templates = [o["spec"]["template"] for o in base if o["kind"] == "StatefulSet"]
    for obj in base:
        if obj["kind"] == "Service":
            selector = obj["spec"]["selector"]
        elif obj["kind"] in ("PodDisruptionBudget", "StatefulSet"):
            selector = obj["spec"]["selector"]["matchLabels"]
        else:
            continue
        pods = [t for t in templates if selector.items() <= t["metadata"]["labels"].items()]
        assert len(pods) == 1, f"{obj['kind']}/{obj['metadata']['name']} selects {len(pods)}"
        if obj["kind"] == "Service":
            ports = {p["name"] for c in pods[0]["spec"]["containers"] for p in c["ports"]}
            assert {p["targetPort"] for p in obj["spec"]["ports"]} <= ports


def test_node_command_line_is_one_meshray_start_accepts(base):
    from meshray.cli.main import build_parser
    from meshray.node.drain import DEFAULT_DRAIN_TIMEOUT_S

    pod = _pod_template(base, "meshray-node")["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    samples = {"POD_NAME": "meshray-node-0", "POD_IP": "10.0.0.7", "MESHRAY_NUM_CPUS": "2",
               "MESHRAY_MEMORY_BYTES": str(6 << 30)}
    argv = container["command"][1:] + container["args"]
    for name in {m for a in argv for m in re.findall(r"\$\((\w+)\)", a)}:
        assert name in env, f"$({name}) is used in the args but not set in env"
    args = build_parser().parse_args(
        [re.sub(r"\$\((\w+)\)", lambda m: samples[m.group(1)], a) for a in argv])
    assert args.command == "start" and args.block and args.host == "0.0.0.0"
    assert args.advertise_host == "10.0.0.7" and args.num_cpus == 2.0
    assert args.memory == 6 << 30 and args.token_file.startswith("/var/run/secrets/")
    assert (args.port, args.dashboard_port, args.metrics_export_port) == (7700, 8265, 8080)
    # The token comes from the Secret's file, never from the command line or env.
    assert args.token is None and "MESHRAY_TOKEN" not in env
    mount = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["token"]
    assert os.path.dirname(args.token_file) == mount
    assert {v["name"]: v for v in pod["volumes"]}["token"]["secret"]["secretName"] == \
        "meshray-token"
    # Memory: requests.memory is the `memory` resource; CPUs: the CPU limit.
    assert env["MESHRAY_MEMORY_BYTES"]["valueFrom"]["resourceFieldRef"]["resource"] == \
        "requests.memory"
    assert env["MESHRAY_NUM_CPUS"]["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"
    # The drain ends before Kubernetes' SIGKILL.
    drain = args.drain_timeout if args.drain_timeout is not None else DEFAULT_DRAIN_TIMEOUT_S
    assert drain + 5 <= pod["terminationGracePeriodSeconds"]
    # The object store fits its memory-backed /dev/shm.
    shm = {v["name"]: v for v in pod["volumes"]}["shm"]["emptyDir"]
    assert shm["medium"] == "Memory" and args.object_store_memory < 2 << 30
    assert shm["sizeLimit"] == "2Gi"


def test_node_probes_use_the_public_health_routes(base):
    from types import SimpleNamespace

    from meshray.node.health import health_routes

    routes = {r.pattern for r in health_routes(SimpleNamespace()) if r.public}
    container = _pod_template(base, "meshray-node")["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/api/healthz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/api/local_raylet_healthz"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert any(re.fullmatch(route, container[probe]["httpGet"]["path"]) for route in routes)
        assert container[probe]["httpGet"]["port"] == "dashboard"


def test_etcd_is_three_members_of_a_safe_release_addressed_by_pod_dns(base):
    from meshray.coordination import etcd_release

    pod = _pod_template(base, "etcd")
    etcd = _one(base, "StatefulSet", "etcd")
    assert etcd["spec"]["replicas"] == 3
    container = pod["spec"]["containers"][0]
    version = tuple(int(p) for p in container["image"].rsplit(":v", 1)[1].split("."))
    assert (3, 5, 3) <= version < (3, 6, 0) and etcd_release.known_bug(version) is None
    args = container["args"]
    for flag in etcd_release.corrupt_check_args(version):
        assert flag in args
    cluster = next(a for a in args if a.startswith("--initial-cluster="))
    assert cluster.count(".etcd.$(POD_NAMESPACE).svc:2380") == 3
    assert _one(base, "Service", "etcd")["spec"]["publishNotReadyAddresses"] is True
    assert _one(base, "PodDisruptionBudget", "etcd")["spec"]["minAvailable"] == 2
    # Nodes and the auth Job dial every member by its pod DNS name.
    members = ",".join(f"etcd-{i}.etcd:2379" for i in range(3))
    node_args = _pod_template(base, "meshray-node")["spec"]["containers"][0]["args"]
    assert f"--address={members}" in node_args
    job = _one(base, "Job", "meshray-etcd-auth")["spec"]["template"]["spec"]["containers"][0]
    assert f"--enable-auth={members}" in job["args"]


def test_the_auth_job_command_line_is_one_meshray_accepts(base):
    from meshray.cli.main import build_parser
    job = _one(base, "Job", "meshray-etcd-auth")["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(job["command"][1:] + job["args"])
    assert args.command == "etcd-credentials" and args.timeout == 300
