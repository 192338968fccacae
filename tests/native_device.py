"""pytest plugin: run the CPU kernel tests on a GPU, natively, without editing them.

    BATON_TEST_DEVICE=cuda TRITON_INTERPRET=0 python -m pytest -p tests.native_device tests/test_kernels_*.py

(`scripts/gpu_check.py` runs it so.) The kernel tests build their inputs on the CPU from seeded
CPU generators; with this plugin every tensor factory call without an explicit device makes its
tensor on BATON_TEST_DEVICE instead, and one drawn from a CPU generator is drawn on the CPU
(the same numbers as in CI) and then moved. So the same tests, with the same tolerances and
the same values, compare every Triton kernel on the GPU with its plain-PyTorch reference.
Without BATON_TEST_DEVICE the plugin does nothing.

The kernel tests also import their device from here, whether or not the plugin is loaded:
`DEVICE` (BATON_TEST_DEVICE, else the CPU), `autocast(dtype)` (autocast on that device: CUDA
autocast on a GPU, so the fused fp16 and bf16 paths meet their references there), and
`skip_on_cuda(why)` for the tests that are about the CPU itself or need the network (the GPU
check runs offline). On a GPU below sm_80 every test parametrised with bf16 is skipped,
saying why: a session there trains in fp16 (torch's bf16 on a T4 is an emulation).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.overrides import TorchFunctionMode

DEVICE = torch.device(os.environ.get("BATON_TEST_DEVICE", "").strip() or "cpu")
ON_CUDA = DEVICE.type == "cuda"
BF16_SKIP = "bf16 needs sm_80 or newer; on this GPU a session trains in fp16"


def autocast(dtype: torch.dtype):
    """Autocast in `dtype` on the test device (CPU autocast in CI, CUDA autocast on a GPU)."""
    return torch.autocast(DEVICE.type, dtype=dtype)


def skip_on_cuda(why: str):
    """Mark a test that holds only on the CPU (or needs the network): skipped on a GPU."""
    return pytest.mark.skipif(ON_CUDA, reason=f"CPU only: {why}")


def ulp(dtype: torch.dtype) -> float:
    """The spacing of `dtype` at 1 (fp32 2^-23, bf16 2^-7, fp16 2^-10): a rounding to it moves
    a value by at most half this, relatively."""
    return torch.finfo(dtype).eps


# Tolerances of fp32 comparisons that hold on a GPU too, derived rather than tuned on the
# interpreter's exact exp/log. Triton's tl.exp is ex2.approx (about 2 ulp) of an argument
# rounded after the multiplication by log2(e): for a result r <= 1 the error is at most
# r * (2 + 1.44 |ln r|) ulp, below 3 ulp for every r (at r = 1/e: 2 + 1.44). Softmax
# gradients in [-1, 1] then differ by a few ulp of 1: 16 ulp (1.9e-6) covers a sum and a
# scale. On the CPU the interpreter calls numpy's exp: the tight 1e-6 stays.
FP32_GRAD_ATOL = 16 * ulp(torch.float32) if ON_CUDA else 1e-6


def bf16_runs_here() -> bool:
    return not ON_CUDA or torch.cuda.get_device_capability(DEVICE) >= (8, 0)

try:  # the list torch's own `with torch.device(...)` mode uses
    from torch.utils._device import _device_constructors
except ImportError:  # pragma: no cover - older or newer torch: the common factories
    def _device_constructors():
        return {torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn,
                torch.randint, torch.randperm, torch.arange, torch.linspace, torch.tensor,
                torch.eye, torch.as_tensor}


class OnDevice(TorchFunctionMode):
    """Tensor factories without a device make their tensors on `device`."""

    def __init__(self, device: str):
        super().__init__()
        self.device = torch.device(device)
        self.constructors = _device_constructors()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func not in self.constructors or kwargs.get("device") is not None:
            return func(*args, **kwargs)
        generator = kwargs.get("generator")
        if generator is not None and generator.device.type != self.device.type:
            grad = kwargs.pop("requires_grad", False)
            return func(*args, **kwargs).to(self.device).requires_grad_(grad)
        kwargs["device"] = self.device
        return func(*args, **kwargs)


_MODE: OnDevice | None = None


def pytest_configure(config) -> None:
    global _MODE
    device = os.environ.get("BATON_TEST_DEVICE", "").strip()
    if device and _MODE is None:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"BATON_TEST_DEVICE={device} but torch sees no CUDA GPU")
        _MODE = OnDevice(device)
        _MODE.__enter__()
        if device.startswith("cuda"):
            # fp32 comparisons in fp32: TF32 keeps 10 mantissa bits in matmuls and convolutions
            # (on by default for cuDNN, and by some libraries for matmuls) and would need
            # bf16-like tolerances where the tests state fp32 ones.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            torch.set_float32_matmul_precision("highest")


def pytest_collection_modifyitems(config, items) -> None:
    if bf16_runs_here():
        return
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if any(value is torch.bfloat16 for value in params.values()):
            item.add_marker(pytest.mark.skip(reason=BF16_SKIP))


def pytest_unconfigure(config) -> None:
    global _MODE
    if _MODE is not None:
        _MODE.__exit__(None, None, None)
        _MODE = None


def pytest_report_header(config) -> str:
    device = os.environ.get("BATON_TEST_DEVICE", "")
    return f"baton native device: {device or 'off'} (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')})"
