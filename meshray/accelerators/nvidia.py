"""NVIDIA GPU discovery and CUDA_VISIBLE_DEVICES handling.

A node daemon calls `detect_gpus()` once at start to size its GPU resource
and learn the accelerator type ("accelerator_type:H100" lets tasks ask for a
GPU model). Discovery must never stop a node from starting: no driver, no
pynvml, or any NVML error just means "no GPUs" (logged at debug level).

Devices are identified by their NVML index (PCI bus order). When the
daemon itself runs under CUDA_VISIBLE_DEVICES it only offers those devices,
so several daemons can share one machine's GPUs. Workers get a
CUDA_VISIBLE_DEVICES naming exactly the devices they were assigned; pass
UUIDs instead of indices to `visible_devices_env` when CUDA's own device
order (fastest first) might differ from PCI order on mixed-GPU machines.
"""
from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from meshray.accelerators.fake import FAKE_GPUS_ENV, FakeNvml

__all__ = [
    "GpuInfo",
    "detect_gpus",
    "accelerator_type_from_name",
    "parse_visible_devices",
    "visible_devices_env",
    "gpu_node_resources",
    "CUDA_VISIBLE_DEVICES",
    "NOSET_ENV",
    "FAKE_GPUS_ENV",
]

logger = logging.getLogger(__name__)

CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
#: If set (non-empty, not "0"), meshray leaves CUDA_VISIBLE_DEVICES of workers alone.
NOSET_ENV = "MESHRAY_NOSET_CUDA_VISIBLE_DEVICES"


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_total_bytes: int
    uuid: str

    @property
    def accelerator_type(self) -> Optional[str]:
        return accelerator_type_from_name(self.name)


def _text(value: Any) -> str:
    # Older pynvml returns bytes, newer returns str.
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)


def _load_pynvml():
    with warnings.catch_warnings():
        # The "pynvml" distribution warns it is deprecated on import; the
        # module (from nvidia-ml-py) is what we want either way.
        warnings.simplefilter("ignore")
        import pynvml  # noqa: PLC0415 - optional, imported only when detecting

    return pynvml


def _query(nvml: Any) -> List[GpuInfo]:
    nvml.nvmlInit()
    try:
        gpus = []
        for i in range(int(nvml.nvmlDeviceGetCount())):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            gpus.append(
                GpuInfo(
                    index=i,
                    name=_text(nvml.nvmlDeviceGetName(handle)),
                    memory_total_bytes=int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
                    uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                )
            )
        return gpus
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception as e:  # noqa: BLE001 - shutdown failure must not lose the result
            logger.debug("nvmlShutdown failed: %s", e)


def parse_visible_devices(value: Optional[str]) -> Optional[List[str]]:
    """Split a CUDA_VISIBLE_DEVICES value; None when unset (= all devices visible)."""
    if value is None:
        return None
    value = value.strip()
    if value in ("", "NoDevFiles"):
        return []
    return [token.strip() for token in value.split(",")]


def _restrict(gpus: List[GpuInfo], tokens: List[str]) -> List[GpuInfo]:
    # CUDA reads the list in order and stops at the first entry that names
    # no device; we do the same so we never offer a GPU CUDA would hide.
    out: List[GpuInfo] = []
    by_index = {g.index: g for g in gpus}
    for token in tokens:
        match: Optional[GpuInfo] = None
        if re.fullmatch(r"\d+", token):
            match = by_index.get(int(token))
        elif token.startswith(("GPU-", "MIG-")):
            hits = [g for g in gpus if g.uuid.startswith(token)]
            match = hits[0] if len(hits) == 1 else None
        if match is None:
            break
        if match not in out:
            out.append(match)
    return out


def detect_gpus(nvml: Any = None, environ: Mapping[str, str] = os.environ) -> List[GpuInfo]:
    """The GPUs this process may use; [] when there are none or NVML fails.

    `nvml` defaults to pynvml, or to a FakeNvml built from MESHRAY_FAKE_GPUS
    when that variable is set (a malformed value raises ValueError: it is a
    test setting, and silently ignoring it would hide the mistake).
    """
    if nvml is None:
        fake = environ.get(FAKE_GPUS_ENV)
        if fake:
            nvml = FakeNvml.from_env(fake)
        else:
            try:
                nvml = _load_pynvml()
            except Exception as e:  # noqa: BLE001 - ImportError or a broken install
                logger.debug("pynvml unavailable, assuming no NVIDIA GPUs: %s", e)
                return []
    try:
        gpus = _query(nvml)
    except Exception as e:  # noqa: BLE001 - any NVML error (no driver, no device) means no GPUs
        logger.debug("NVML query failed, assuming no NVIDIA GPUs: %s", e)
        return []
    tokens = parse_visible_devices(environ.get(CUDA_VISIBLE_DEVICES))
    if tokens is None:
        return gpus
    return _restrict(gpus, tokens)


# Known datacenter/workstation model codes, matched as whole words in the
# NVML name ("NVIDIA A100-SXM4-80GB" -> "A100"; "-SXM4..." is a SKU suffix).
_KNOWN_MODELS = (
    "GB300", "GB200", "GH200", "B300", "B200", "B100",
    "H800", "H200", "H100", "H20",
    "L40S", "L40", "L20", "L4",
    "A800", "A100", "A40", "A30", "A16", "A10G", "A10", "A2",
    "V100", "P100", "P40", "P4", "T4", "K80", "M60",
)
_KNOWN_RE = re.compile(r"(?<![A-Za-z0-9])(" + "|".join(_KNOWN_MODELS) + r")(?![A-Za-z0-9])")
_VENDOR_WORDS = {"NVIDIA", "Tesla", "GeForce", "Quadro"}


def accelerator_type_from_name(name: Optional[str]) -> Optional[str]:
    """The accelerator type Ray would use for an NVML device name, e.g. "H100".

    Well-known models map to their bare code; other names fall back to the
    product words up to the first one with a digit, joined with "-"
    ("NVIDIA GeForce RTX 4090" -> "RTX-4090", "NVIDIA RTX A6000" ->
    "RTX-A6000"), so the resource name has no spaces. None if nothing
    recognisable is left.
    """
    if not name:
        return None
    m = _KNOWN_RE.search(name)
    if m:
        return m.group(1)
    words = [w for w in name.replace("_", " ").split() if w not in _VENDOR_WORDS]
    picked: List[str] = []
    for word in words:
        word = word.split("-")[0] if any(c.isdigit() for c in word) else word
        if not re.fullmatch(r"[A-Z0-9]+", word):
            break
        picked.append(word)
        if any(c.isdigit() for c in word):
            return "-".join(picked)
    return None


def visible_devices_env(
    ids: Iterable[Union[int, str]], environ: Mapping[str, str] = os.environ
) -> Dict[str, str]:
    """Env vars that pin a worker to `ids`; {} when NOSET_ENV asks us not to touch them."""
    flag = environ.get(NOSET_ENV, "")
    if flag and flag.strip().lower() not in ("0", "false", "no"):
        return {}
    return {CUDA_VISIBLE_DEVICES: ",".join(str(i) for i in ids)}


def gpu_node_resources(gpus: Sequence[GpuInfo]) -> Dict[str, float]:
    """Node resources contributed by `gpus`: GPU count and accelerator_type:<T> (first GPU's)."""
    if not gpus:
        return {}
    out = {"GPU": float(len(gpus))}
    kind = gpus[0].accelerator_type
    if kind:
        out[f"accelerator_type:{kind}"] = 1.0
    return out
