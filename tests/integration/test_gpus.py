"""GPU scheduling and isolation with a fake NVML (two fake H100s)."""
from __future__ import annotations

import json
import os
import time

import pytest

FAKE = json.dumps([{"name": "NVIDIA H100 80GB HBM3", "memory": 85899345920},
                   {"name": "NVIDIA H100 80GB HBM3", "memory": 85899345920}])


@pytest.fixture(scope="module")
def ray():
    import meshray
    previous = os.environ.get("MESHRAY_FAKE_GPUS")
    os.environ["MESHRAY_FAKE_GPUS"] = FAKE
    try:
        meshray.init(num_cpus=4)
    finally:
        if previous is None:
            os.environ.pop("MESHRAY_FAKE_GPUS", None)
        else:
            os.environ["MESHRAY_FAKE_GPUS"] = previous
    yield meshray
    meshray.shutdown()


def test_detected_gpus_are_resources_and_labels(ray):
    resources = ray.cluster_resources()
    assert resources.get("GPU") == 2.0, (resources, ray.nodes())
    assert resources["accelerator_type:H100"] == 1.0
    labels = ray.nodes()[0]["Labels"]
    assert "H100" in labels["gpu_names"]
    assert labels["gpu_memory_bytes"].split(",") == ["85899345920", "85899345920"]


def test_task_sees_exactly_its_devices(ray):
    @ray.remote(num_gpus=1)
    def which():
        return (os.environ.get("CUDA_VISIBLE_DEVICES"), ray.get_gpu_ids(),
                ray.get_runtime_context().get_accelerator_ids()["GPU"])

    visible, ids, accel = ray.get(which.remote())
    assert visible in ("0", "1")
    assert ids == [int(visible)]
    assert accel == [visible]


def test_concurrent_whole_gpu_tasks_get_distinct_devices(ray, tmp_path):
    @ray.remote(num_gpus=1)
    def hold(path):
        device = os.environ["CUDA_VISIBLE_DEVICES"]
        open(os.path.join(path, device), "w").write("busy")
        deadline = time.time() + 20
        while len(os.listdir(path)) < 2 and time.time() < deadline:
            time.sleep(0.02)
        return device

    devices = ray.get([hold.remote(str(tmp_path)), hold.remote(str(tmp_path))], timeout=60)
    assert sorted(devices) == ["0", "1"]


def test_fractional_requests_share_one_device(ray, tmp_path):
    @ray.remote(num_gpus=0.5)
    def half(path, tag):
        open(os.path.join(path, tag), "w").write(os.environ["CUDA_VISIBLE_DEVICES"])
        deadline = time.time() + 20
        while len(os.listdir(path)) < 2 and time.time() < deadline:
            time.sleep(0.02)
        return os.environ["CUDA_VISIBLE_DEVICES"]

    a, b = ray.get([half.remote(str(tmp_path), "a"), half.remote(str(tmp_path), "b")], timeout=60)
    assert a == b  # packed onto one device, never split


def test_gpu_actor_keeps_its_device(ray):
    @ray.remote(num_gpus=1)
    class Trainer:
        def device(self):
            return os.environ["CUDA_VISIBLE_DEVICES"], ray.get_gpu_ids()

    trainer = Trainer.remote()
    visible, ids = ray.get(trainer.device.remote())
    assert ids == [int(visible)]
    assert ray.get(trainer.device.remote())[0] == visible
    ray.kill(trainer)


def test_accelerator_type_option(ray):
    @ray.remote(accelerator_type="H100", num_gpus=1)
    def on_h100():
        return "ok"

    @ray.remote(accelerator_type="A100", num_gpus=1)
    def on_a100():
        return "never"

    assert ray.get(on_h100.remote()) == "ok"
    ready, _ = ray.wait([on_a100.remote()], timeout=0.5)
    assert ready == []


def test_bad_gpu_requests(ray):
    with pytest.raises(ValueError):
        ray.remote(num_gpus=-1)(lambda: 1)
    with pytest.raises(ValueError):
        ray.remote(num_gpus=1.5)(lambda: 1)


def test_noset_env_leaves_cuda_visible_devices_alone():
    from tests.helpers import run_driver
    code = """
import os, meshray as ray
ray.init(num_cpus=1)
@ray.remote(num_gpus=1)
def f(): return os.environ.get("CUDA_VISIBLE_DEVICES", "unset"), ray.get_gpu_ids()
print(ray.get(f.remote()))
ray.shutdown()
"""
    env = dict(os.environ, MESHRAY_FAKE_GPUS="1", MESHRAY_NOSET_CUDA_VISIBLE_DEVICES="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    result = run_driver(code, env=env)
    assert result.returncode == 0, result.stderr
    assert "('unset', [0])" in result.stdout


def test_gpu_bundle_keeps_device_ids_for_work_in_it(ray):
    from meshray.util.placement_group import placement_group, remove_placement_group
    from meshray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    pg = placement_group([{"GPU": 1, "CPU": 1}])
    assert pg.wait(20)

    @ray.remote(num_gpus=0.5, num_cpus=0.5)
    def device():
        return os.environ["CUDA_VISIBLE_DEVICES"], ray.get_gpu_ids()

    strategy = PlacementGroupSchedulingStrategy(pg, 0)
    first = ray.get(device.options(scheduling_strategy=strategy).remote(), timeout=60)
    second = ray.get(device.options(scheduling_strategy=strategy).remote(), timeout=60)
    assert first == second and first[1] == [int(first[0])]
    remove_placement_group(pg)
