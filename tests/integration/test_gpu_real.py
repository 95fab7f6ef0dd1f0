"""On a real NVIDIA GPU: detection matches nvidia-smi and tasks are isolated.

Skipped where there is no GPU; run it on a GPU machine with
`python -m pytest tests/integration/test_gpu_real.py -v`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest


def _smi_gpus():
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    return [line.split(", ") for line in out.stdout.strip().splitlines() if line]


SMI = _smi_gpus()
pytestmark = [pytest.mark.skipif(not SMI or os.environ.get("MESHRAY_FAKE_GPUS"),
                                 reason="needs a real NVIDIA GPU"),
              pytest.mark.meshray_init(num_cpus=2)]


def test_detection_matches_nvidia_smi(ray):
    from meshray.accelerators.nvidia import detect_gpus
    gpus = detect_gpus()
    assert len(gpus) == len(SMI)
    assert [g.name for g in gpus] == [row[1] for row in SMI]
    for gpu, row in zip(gpus, SMI):
        assert abs(gpu.memory_total_bytes / 2**20 - float(row[2])) < 2  # MiB
    assert ray.cluster_resources()["GPU"] == float(len(SMI))


def test_task_sees_exactly_one_device(ray):
    @ray.remote(num_gpus=1)
    def count_devices():
        try:
            import torch
            return "torch", torch.cuda.device_count(), os.environ["CUDA_VISIBLE_DEVICES"]
        except ImportError:
            import pynvml
            pynvml.nvmlInit()
            try:
                return "nvml-visible", len(os.environ["CUDA_VISIBLE_DEVICES"].split(",")), \
                    os.environ["CUDA_VISIBLE_DEVICES"]
            finally:
                pynvml.nvmlShutdown()

    how, count, visible = ray.get(count_devices.remote(), timeout=120)
    assert count == 1, (how, count, visible)
    print(f"isolation via {how}: task saw {count} device (CUDA_VISIBLE_DEVICES={visible})")


def test_two_one_gpu_tasks_on_one_gpu_node_run_one_after_the_other(ray):
    if len(SMI) != 1:
        pytest.skip("needs exactly one GPU")

    @ray.remote(num_gpus=1)
    def occupy():
        start = time.time()
        time.sleep(1.0)
        return start, time.time()

    (s1, e1), (s2, e2) = ray.get([occupy.remote(), occupy.remote()], timeout=120)
    assert e1 <= s2 or e2 <= s1  # never overlapping
