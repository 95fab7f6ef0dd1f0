"""Accelerator discovery (NVIDIA GPUs) and per-worker device pinning.

`detect_gpus` is safe to call anywhere: without a driver it returns [].
Set MESHRAY_FAKE_GPUS to pretend devices exist (see `fake`).
"""
from meshray.accelerators.fake import FAKE_GPUS_ENV, FakeNvml
from meshray.accelerators.nvidia import (
    CUDA_VISIBLE_DEVICES,
    NOSET_ENV,
    GpuInfo,
    accelerator_type_from_name,
    detect_gpus,
    gpu_node_resources,
    parse_visible_devices,
    visible_devices_env,
)

__all__ = [
    "FAKE_GPUS_ENV",
    "FakeNvml",
    "CUDA_VISIBLE_DEVICES",
    "NOSET_ENV",
    "GpuInfo",
    "accelerator_type_from_name",
    "detect_gpus",
    "gpu_node_resources",
    "parse_visible_devices",
    "visible_devices_env",
]
