"""Which device this session trains on, and the precision policy that follows from it.

bf16 on compute capability >= 8.0; fp16 with dynamic loss scaling on 7.x (T4) and 6.x (P100);
fp32 on the CPU. `train.precision` (or `--precision`) forces one: the CPU runs fp16 and bf16
under its own autocast, which is how the GPU's mixed-precision paths are tested without a GPU.
A GPU the installed torch has no kernels for (a P100, sm_60, under a torch built
for sm_70 and up) is refused at start, before any download, with the torch build that fits it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

import torch


ARCH = re.compile(r"^(sm|compute)_(\d+)(\d)[a-z]?$")  # sm_86, sm_90a, compute_70


PRECISIONS = ("fp32", "fp16", "bf16")


class UnsupportedGPUError(RuntimeError):
    """The installed torch was not built for this GPU's compute capability."""


class PrecisionError(ValueError):
    """A precision this device cannot train in."""


@dataclass
class DeviceInfo:
    name: str  # "cpu" or the GPU's marketing name, e.g. "Tesla T4"
    device: str  # torch device string: "cpu", "cuda:0"
    capability: Optional[tuple[int, int]]  # None on the CPU
    precision: str  # "bf16" | "fp16" | "fp32"
    gpu_count: int = 0
    kernels: str = "none"  # "triton" | "reference" | "none", set once the model is patched

    @property
    def type(self) -> str:
        return torch.device(self.device).type

    @property
    def dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
            self.precision
        ]

    @property
    def uses_scaler(self) -> bool:
        return self.precision == "fp16"


def precision_for(capability: Optional[tuple[int, int]]) -> str:
    """The automatic policy: what the fastest QLoRA trainers use on each GPU generation."""
    if capability is None:
        return "fp32"
    return "bf16" if capability >= (8, 0) else "fp16"


def resolve_precision(requested: str, capability: Optional[tuple[int, int]]) -> str:
    """`auto` by the policy, else the requested one. bf16 below sm_80 is refused: torch says
    such a GPU "supports" bf16, but by emulation, several times slower than fp16."""
    if requested == "auto":
        return precision_for(capability)
    if requested not in PRECISIONS:
        raise PrecisionError(f"precision {requested!r} is not one of auto, "
                             f"{', '.join(PRECISIONS)}; fix train.precision or --precision")
    if requested == "bf16" and capability is not None and capability < (8, 0):
        raise PrecisionError(
            f"bf16 needs compute capability 8.0 or newer; this GPU is sm_{capability[0]}"
            f"{capability[1]}. Use --precision fp16 (or auto) on it")
    return requested


def arch_supported(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """True when torch ships SASS for this major (same or lower minor) or PTX at or below it."""
    major, minor = capability
    for arch in arch_list:
        match = ARCH.match(arch)
        if not match:
            continue
        kind, a_major, a_minor = match.group(1), int(match.group(2)), int(match.group(3))
        if kind == "sm" and a_major == major and a_minor <= minor:
            return True
        if kind == "compute" and (a_major, a_minor) <= capability:
            return True
    return False


def build_hint(capability: tuple[int, int]) -> str:
    """A torch build known to carry kernels for this capability."""
    if capability < (7, 0):
        return ("torch 2.5.1 built for CUDA 12.1 (kernels for sm_50 to sm_90): "
                "pip install torch==2.5.1 --index-url https://download.pytorch.org/whl/cu121")
    if capability >= (10, 0):
        return ("torch 2.7 or newer built for CUDA 12.8: "
                "pip install 'torch>=2.7' --index-url https://download.pytorch.org/whl/cu128")
    return ("a torch built for CUDA 12.4 or newer: "
            "pip install torch --index-url https://download.pytorch.org/whl/cu124")


def check_gpu(index: int) -> tuple[int, int]:
    capability = torch.cuda.get_device_capability(index)
    arch_list = torch.cuda.get_arch_list()
    if arch_list and not arch_supported(capability, arch_list):
        name = torch.cuda.get_device_name(index)
        raise UnsupportedGPUError(
            f"{name} has compute capability sm_{capability[0]}{capability[1]}, but this torch "
            f"{torch.__version__} was built only for {', '.join(arch_list)}. Install "
            f"{build_hint(capability)}"
        )
    return capability


def _cuda_index(requested: Optional[str]) -> int:
    if requested and ":" in requested:
        return int(requested.split(":", 1)[1])
    return rank_cuda_index()


def rank_cuda_index() -> int:
    """This rank's GPU: under torchrun each process trains on its own; more ranks than GPUs
    (BATON_WORLD_SIZE, the GPU check's 2 ranks on 1 GPU) share them in turn."""
    return int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count())


def detect_device(requested: Optional[str] = None, precision: str = "auto") -> DeviceInfo:
    """The device to train on ("cpu", "cuda", "cuda:N" or None for the best available), in
    `precision` ("auto" for the policy)."""
    want_cuda = requested.startswith("cuda") if requested else torch.cuda.is_available()
    if not want_cuda:
        if requested and requested != "cpu":
            raise ValueError(f"device {requested!r} is not 'cpu', 'cuda' or 'cuda:N'")
        return DeviceInfo(name="cpu", device="cpu", capability=None,
                          precision=resolve_precision(precision, None))
    if not torch.cuda.is_available():
        raise UnsupportedGPUError(
            f"device {requested!r} was asked for but torch {torch.__version__} sees no CUDA GPU; "
            "install a CUDA build of torch or pass device='cpu'"
        )
    index = _cuda_index(requested)
    capability = check_gpu(index)
    return DeviceInfo(
        name=torch.cuda.get_device_name(index), device=f"cuda:{index}",
        capability=capability, precision=resolve_precision(precision, capability),
        gpu_count=torch.cuda.device_count(),
    )
