"""Choose between the Triton kernels and the plain-PyTorch references for one device.

The choice is made once, when a session starts (`select_backend`), and recorded by the caller
(the session record's `kernels` field). `BATON_KERNELS` overrides it, read at call time:
- `triton`: tests force it on the CPU together with `TRITON_INTERPRET=1`;
- `reference`: a user who hits a kernel bug forces the plain-PyTorch ops without a code change;
- `none`: the model is not patched at all and trains with the plain Hugging Face / PEFT
  modules (`patching_enabled()` is False), to rule Baton's kernels out entirely;
- unset or `auto`: the automatic choice by device.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

import torch

Backend = Literal["triton", "reference"]
BACKENDS: tuple[str, ...] = ("triton", "reference")
NO_PATCHING = "none"  # a kernel path, not a backend: nothing is patched
ENV_VAR = "BATON_KERNELS"
ENV_CHOICES: tuple[str, ...] = ("auto", *BACKENDS, NO_PATCHING)

# Triton's own floor: its NVIDIA backend targets sm_75 and newer, so P100 (6.0) and
# V100 (7.0) run the references.
MIN_CAPABILITY = (7, 5)


class KernelBackendError(RuntimeError):
    """The requested kernel backend cannot run here."""


def triton_available() -> bool:
    """True when the `triton` package can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when Triton kernels run in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in {"1", "true", "yes", "on"}


def _as_device(device: torch.device | str) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def kernels_choice() -> str:
    """`BATON_KERNELS` as one of ENV_CHOICES ("auto" when unset); read now, not at import."""
    raw = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if raw not in ENV_CHOICES:
        raise KernelBackendError(
            f"{ENV_VAR}={raw!r} is not a kernel path; set it to 'triton', 'reference', "
            "'none' (no patching) or unset it (automatic choice)."
        )
    return raw


def patching_enabled() -> bool:
    """False when `BATON_KERNELS=none`: train with the plain HF / PEFT modules, patch nothing.

    `kernels.patch.patch_model` checks it itself; an invalid value raises KernelBackendError.
    """
    return kernels_choice() != NO_PATCHING


def _forced_backend() -> Backend | None:
    choice = kernels_choice()
    if choice == NO_PATCHING:
        # Nothing is patched, but an op called directly still needs a backend: the plain-PyTorch
        # one, so that with "none" no Baton Triton kernel runs anywhere.
        return "reference"
    return None if choice == "auto" else choice  # type: ignore[return-value]


def _check_forced_triton(device: torch.device) -> None:
    if not triton_available():
        raise KernelBackendError(
            f"{ENV_VAR}=triton but the triton package is not installed; "
            "pip install triton, or set BATON_KERNELS=reference."
        )
    if device.type == "cpu" and not interpreter_enabled():
        raise KernelBackendError(
            f"{ENV_VAR}=triton on the CPU needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "before Python starts, or set BATON_KERNELS=reference."
        )


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """Compute capability of a CUDA device, or None for any other device."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def select_backend(device: torch.device | str) -> Backend:
    """Return "triton" or "reference" for `device`.

    Triton on CUDA devices of capability >= 7.5 when triton imports; the reference
    everywhere else (CPU, P100, V100, MPS). `BATON_KERNELS` forces either; with
    `BATON_KERNELS=none` it is "reference" (nothing is patched; see `patching_enabled`).
    """
    dev = _as_device(device)
    forced = _forced_backend()
    if forced == "triton":
        _check_forced_triton(dev)
        return "triton"
    if forced == "reference":
        return "reference"
    return backend_for_capability(cuda_capability(dev), triton_available())


def backend_for_capability(capability: tuple[int, int] | None, has_triton: bool) -> Backend:
    """The automatic choice: Triton on CUDA capability >= 7.5 (T4 and newer) when it imports."""
    if capability is not None and tuple(capability) >= MIN_CAPABILITY and has_triton:
        return "triton"
    return "reference"


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (Triton block sizes must be powers of two)."""
    return 1 << max(0, int(n) - 1).bit_length()


def num_warps_for(block_elements: int) -> int:
    """Warps for a program holding `block_elements` values: about 8 to 16 values a thread."""
    if block_elements >= 16384:
        return 16
    if block_elements >= 4096:
        return 8
    return 4


def check_launchable(*tensors: torch.Tensor) -> None:
    """Fail with a clear message before Triton tries to launch on a CPU tensor."""
    for t in tensors:
        if t.device.type == "cpu" and not interpreter_enabled():
            raise KernelBackendError(
                "a Triton kernel was called on a CPU tensor without TRITON_INTERPRET=1; "
                "use the reference op on the CPU, or set TRITON_INTERPRET=1 before Python starts."
            )


def launchable(t: torch.Tensor) -> bool:
    """True when a Triton kernel can run on `t` here: a CUDA tensor, or any in the interpreter."""
    return t.device.type == "cuda" or interpreter_enabled()
