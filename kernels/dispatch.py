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

# The errors live in kernels.errors (kernels._triton raises them too); callers import them here.
from baton.kernels.errors import KernelBackendError, KernelChoiceError, TritonMissingError  # noqa: F401

Backend = Literal["triton", "reference"]
BACKENDS: tuple[str, ...] = ("triton", "reference")
NO_PATCHING = "none"  # a kernel path, not a backend: nothing is patched
ENV_VAR = "BATON_KERNELS"
ENV_CHOICES: tuple[str, ...] = ("auto", *BACKENDS, NO_PATCHING)

# Triton's own floor: its NVIDIA backend targets sm_75 and newer, so P100 (6.0) and
# V100 (7.0) run the references.
MIN_CAPABILITY = (7, 5)


def triton_available() -> bool:
    """True when the `triton` package imports here.

    A cheap look at the path first (no Triton, no import); when a `triton` is there it is
    imported (once, through `kernels._triton`), since an install that fails to import (a
    wheel for another platform, a broken CUDA toolkit) is as good as absent.
    """
    if importlib.util.find_spec("triton") is None:
        return False
    from baton.kernels._triton import HAS_TRITON

    return HAS_TRITON


def interpreter_enabled() -> bool:
    """True when Triton kernels run in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in {"1", "true", "yes", "on"}


def _as_device(device: torch.device | str) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def kernels_choice() -> str:
    """`BATON_KERNELS` as one of ENV_CHOICES ("auto" when unset); read now, not at import."""
    raw = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if raw not in ENV_CHOICES:
        raise KernelChoiceError(
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


def check_triton_capability(capability: tuple[int, int] | None) -> None:
    """Refuse Triton kernels on a CUDA GPU below sm_75 (P100, V100), with what to do instead.

    `capability` is the GPU's compute capability, None for a device that is not a CUDA GPU
    (the CPU interpreter is checked elsewhere). Raises KernelChoiceError.
    """
    if capability is not None and tuple(capability) < MIN_CAPABILITY:
        major, minor = capability
        raise KernelChoiceError(
            f"Triton kernels need a CUDA GPU of compute capability "
            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (T4 and up); this GPU is "
            f"sm_{major}{minor}, below Triton's floor. Unset {ENV_VAR} (the automatic choice "
            f"runs the plain-PyTorch path on it) or set {ENV_VAR}=reference."
        )


def _check_forced_triton(device: torch.device, capability: tuple[int, int] | None) -> None:
    if device.type == "cuda":
        check_triton_capability(capability)  # a P100 learns that first, not "install triton"
    if not triton_available():
        raise KernelChoiceError(
            f"{ENV_VAR}=triton but the triton package does not import here; "
            f"pip install triton (Linux), or set {ENV_VAR}=reference."
        )
    if device.type == "cpu" and not interpreter_enabled():
        raise KernelChoiceError(
            f"{ENV_VAR}=triton on the CPU needs Triton's interpreter: set TRITON_INTERPRET=1 "
            f"before Python starts, or set {ENV_VAR}=reference."
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
    A forced "triton" that cannot run here (a GPU below sm_75, no triton, the CPU without
    the interpreter) raises KernelChoiceError, a ValueError: invalid input, exit 2.
    """
    dev = _as_device(device)
    forced = _forced_backend()
    capability = cuda_capability(dev)
    if forced == "triton":
        _check_forced_triton(dev, capability)
        return "triton"
    if forced == "reference":
        return "reference"
    return backend_for_capability(capability, triton_available)


def backend_for_capability(
    capability: tuple[int, int] | None, has_triton, forced: str | None = None
) -> Backend:
    """The choice for a CUDA `capability` (None: not a CUDA GPU), without touching a device.

    Automatic (`forced` None or "auto"): Triton on capability >= 7.5 (T4 and newer) when
    Triton imports, the reference elsewhere. `forced="triton"` on a CUDA GPU below 7.5 raises
    KernelChoiceError (exit 2 at the session); `forced="reference"` is the reference.
    `has_triton` is a bool, or a callable asked only when the answer matters (importing
    Triton takes a while, and the CPU never needs it).
    """
    if forced == "reference":
        return "reference"
    if forced == "triton":
        check_triton_capability(capability)
        return "triton"
    if capability is None or tuple(capability) < MIN_CAPABILITY:
        return "reference"
    return "triton" if (has_triton() if callable(has_triton) else has_triton) else "reference"


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
