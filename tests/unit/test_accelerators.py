"""GPU discovery with a fake NVML, CUDA_VISIBLE_DEVICES handling, type names."""
import logging

import pytest

from meshray.accelerators import fake as fake_mod
from meshray.accelerators.fake import FakeNvml
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

H100 = {"name": "NVIDIA H100 80GB HBM3", "memory": 85899345920}


def four():
    return FakeNvml([dict(H100, uuid=f"GPU-{i}aaa-bbbb") for i in range(4)])


def test_detect_with_fake():
    nvml = four()
    gpus = detect_gpus(nvml=nvml, environ={})
    assert [g.index for g in gpus] == [0, 1, 2, 3]
    assert gpus[0] == GpuInfo(0, "NVIDIA H100 80GB HBM3", 85899345920, "GPU-0aaa-bbbb")
    assert gpus[0].accelerator_type == "H100"
    assert nvml.initialized == 1 and nvml.shutdowns == 1


def test_no_devices():
    assert detect_gpus(nvml=FakeNvml([]), environ={}) == []


@pytest.mark.parametrize(
    "fail_on",
    ["nvmlInit", "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetName",
     "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetUUID"],
)
def test_any_nvml_error_means_no_gpus(fail_on, caplog):
    caplog.set_level(logging.DEBUG, logger="meshray.accelerators.nvidia")
    assert detect_gpus(nvml=FakeNvml([H100], fail_on=fail_on), environ={}) == []
    assert any("NVML" in r.getMessage() for r in caplog.records)


def test_shutdown_error_keeps_result():
    gpus = detect_gpus(nvml=FakeNvml([H100], fail_on="nvmlShutdown"), environ={})
    assert len(gpus) == 1


def test_bytes_names_from_old_pynvml():
    class BytesNvml(FakeNvml):
        def nvmlDeviceGetName(self, handle):
            return super().nvmlDeviceGetName(handle).encode()

        def nvmlDeviceGetUUID(self, handle):
            return super().nvmlDeviceGetUUID(handle).encode()

    gpus = detect_gpus(nvml=BytesNvml([H100]), environ={})
    assert gpus[0].name == "NVIDIA H100 80GB HBM3" and gpus[0].uuid.startswith("GPU-")


@pytest.mark.parametrize(
    "value, expected",
    [
        ("", []),
        ("NoDevFiles", []),
        ("2", [2]),
        ("3,1", [3, 1]),
        (" 0 , 2 ", [0, 2]),
        ("1,7,2", [1]),  # CUDA stops at the first invalid entry
        ("-1", []),
        ("GPU-2aaa", [2]),  # unique UUID prefix
        ("GPU-2aaa-bbbb,0", [2, 0]),
        ("GPU-", []),  # ambiguous prefix
        ("0,0", [0]),
    ],
)
def test_cuda_visible_devices_restricts(value, expected):
    gpus = detect_gpus(nvml=four(), environ={CUDA_VISIBLE_DEVICES: value})
    assert [g.index for g in gpus] == expected


def test_parse_visible_devices():
    assert parse_visible_devices(None) is None
    assert parse_visible_devices("") == []
    assert parse_visible_devices("0,GPU-x") == ["0", "GPU-x"]


def test_fake_gpus_env(monkeypatch):
    env = {fake_mod.FAKE_GPUS_ENV: '[{"name":"NVIDIA H100 80GB HBM3","memory":85899345920}, {}]'}
    gpus = detect_gpus(environ=env)
    assert len(gpus) == 2
    assert gpus[0].name == "NVIDIA H100 80GB HBM3" and gpus[0].memory_total_bytes == 85899345920
    assert gpus[1].name == fake_mod.DEFAULT_FAKE_NAME
    assert gpus[0].uuid != gpus[1].uuid
    assert len(detect_gpus(environ={fake_mod.FAKE_GPUS_ENV: "3"})) == 3
    both = {fake_mod.FAKE_GPUS_ENV: "3", CUDA_VISIBLE_DEVICES: "2"}
    assert [g.index for g in detect_gpus(environ=both)] == [2]
    for bad in ("not json", '{"name": "x"}', '[{"nmae": "x"}]', "[3]"):
        with pytest.raises(ValueError, match="GPU"):
            detect_gpus(environ={fake_mod.FAKE_GPUS_ENV: bad})


def test_real_pynvml_never_raises():
    # On a GPU-less machine this is [] (driver missing); on a GPU box, real devices.
    gpus = detect_gpus(environ={})
    assert isinstance(gpus, list)
    assert all(isinstance(g, GpuInfo) for g in gpus)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA H200 NVL", "H200"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A100-PCIE-40GB", "A100"),
        ("Tesla V100-SXM2-16GB", "V100"),
        ("Tesla T4", "T4"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA A10G", "A10G"),
        ("NVIDIA A10", "A10"),
        ("NVIDIA GH200 480GB", "GH200"),
        ("NVIDIA B200", "B200"),
        ("Tesla K80", "K80"),
        ("NVIDIA GeForce RTX 4090", "RTX-4090"),
        ("NVIDIA RTX A6000", "RTX-A6000"),
        ("NVIDIA RTX PRO 6000 Blackwell Server Edition", "RTX-PRO-6000"),
        ("NVIDIA Fake GPU", None),
        ("", None),
        (None, None),
    ],
)
def test_accelerator_type_from_name(name, expected):
    assert accelerator_type_from_name(name) == expected


def test_visible_devices_env():
    assert visible_devices_env([0, 2], environ={}) == {CUDA_VISIBLE_DEVICES: "0,2"}
    assert visible_devices_env([], environ={}) == {CUDA_VISIBLE_DEVICES: ""}
    assert visible_devices_env(["GPU-abc"], environ={}) == {CUDA_VISIBLE_DEVICES: "GPU-abc"}
    assert visible_devices_env([1], environ={NOSET_ENV: "1"}) == {}
    assert visible_devices_env([1], environ={NOSET_ENV: "0"}) == {CUDA_VISIBLE_DEVICES: "1"}
    assert NOSET_ENV == "MESHRAY_NOSET_CUDA_VISIBLE_DEVICES"


def test_gpu_node_resources():
    gpus = detect_gpus(nvml=four(), environ={})
    assert gpu_node_resources(gpus) == {"GPU": 4.0, "accelerator_type:H100": 1.0}
    assert gpu_node_resources([]) == {}
    assert gpu_node_resources(detect_gpus(nvml=FakeNvml([{}]), environ={})) == {"GPU": 1.0}


@pytest.mark.gpu
def test_real_gpu_detected():
    gpus = detect_gpus(environ={})
    if not gpus:
        pytest.skip("no NVIDIA GPU here")
    assert gpus[0].memory_total_bytes > 0 and gpus[0].uuid.startswith(("GPU-", "MIG-"))
    assert gpus[0].accelerator_type
