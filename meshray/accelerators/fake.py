"""A stand-in for pynvml with a configurable device list.

Unit tests inject it into `detect_gpus(nvml=...)`; integration tests on
GPU-less machines set MESHRAY_FAKE_GPUS so node daemons "see" GPUs and the
scheduling, CUDA_VISIBLE_DEVICES and accelerator_type paths run for real.

MESHRAY_FAKE_GPUS is either a count ("2") or a JSON list of devices, each
a dict with optional "name", "memory" (bytes) and "uuid".
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, List, Mapping, Optional, Union

__all__ = ["FakeNvml", "FakeDevice", "FAKE_GPUS_ENV", "DEFAULT_FAKE_NAME", "DEFAULT_FAKE_MEMORY"]

FAKE_GPUS_ENV = "MESHRAY_FAKE_GPUS"
DEFAULT_FAKE_NAME = "NVIDIA Fake GPU"
DEFAULT_FAKE_MEMORY = 16 * 1024**3


class _FakeNVMLError(Exception):
    """Same role as pynvml.NVMLError: the one error type NVML calls raise."""


@dataclass(frozen=True)
class FakeDevice:
    name: str = DEFAULT_FAKE_NAME
    memory: int = DEFAULT_FAKE_MEMORY
    uuid: str = ""


@dataclass(frozen=True)
class _MemoryInfo:
    total: int
    free: int
    used: int


def _fake_uuid(index: int) -> str:
    return f"GPU-{index:08x}-fake-4000-8000-000000000000"


class FakeNvml:
    """Implements the pynvml calls meshray makes, over an in-memory device list.

    `fail_on` names a method that raises NVMLError, to test error tolerance.
    """

    NVMLError = _FakeNVMLError

    def __init__(
        self,
        devices: Iterable[Union[FakeDevice, Mapping[str, Any]]] = (),
        *,
        fail_on: Optional[str] = None,
    ):
        devs: List[FakeDevice] = []
        for i, d in enumerate(devices):
            if isinstance(d, FakeDevice):
                dev = d
            elif isinstance(d, Mapping):
                unknown = set(d) - {"name", "memory", "uuid"}
                if unknown:
                    raise ValueError(
                        f"Fake GPU {i} has unknown keys {sorted(unknown)}; expected "
                        f"'name', 'memory', 'uuid'."
                    )
                dev = FakeDevice(
                    name=str(d.get("name", DEFAULT_FAKE_NAME)),
                    memory=int(d.get("memory", DEFAULT_FAKE_MEMORY)),
                    uuid=str(d.get("uuid", "")),
                )
            else:
                raise ValueError(f"Fake GPU {i} must be a dict or FakeDevice, got {d!r}.")
            if not dev.uuid:
                dev = FakeDevice(dev.name, dev.memory, _fake_uuid(i))
            devs.append(dev)
        self.devices = devs
        self.fail_on = fail_on
        self.initialized = 0
        self.shutdowns = 0

    @classmethod
    def from_env(cls, value: str) -> "FakeNvml":
        """Parse a MESHRAY_FAKE_GPUS value (a count or a JSON list)."""
        text = value.strip()
        if text.isdigit():
            return cls([{} for _ in range(int(text))])
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{FAKE_GPUS_ENV} must be a device count or a JSON list of "
                f"{{\"name\", \"memory\", \"uuid\"}} objects, got {value!r}: {e}"
            ) from None
        if not isinstance(parsed, list):
            raise ValueError(f"{FAKE_GPUS_ENV} must be a JSON list, got {value!r}.")
        return cls(parsed)

    def _maybe_fail(self, method: str) -> None:
        if self.fail_on == method:
            raise _FakeNVMLError(f"fake NVML failure in {method}")

    def nvmlInit(self) -> None:
        self._maybe_fail("nvmlInit")
        self.initialized += 1

    def nvmlShutdown(self) -> None:
        self._maybe_fail("nvmlShutdown")
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        self._maybe_fail("nvmlDeviceGetCount")
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._maybe_fail("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.devices):
            raise _FakeNVMLError(f"invalid device index {index}")
        return index

    def nvmlDeviceGetName(self, handle: int) -> str:
        self._maybe_fail("nvmlDeviceGetName")
        return self.devices[handle].name

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> _MemoryInfo:
        self._maybe_fail("nvmlDeviceGetMemoryInfo")
        total = self.devices[handle].memory
        return _MemoryInfo(total=total, free=total, used=0)

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        self._maybe_fail("nvmlDeviceGetUUID")
        return self.devices[handle].uuid
