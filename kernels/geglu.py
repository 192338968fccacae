"""GeGLU, the gated activation of the Gemma MLP: h = gelu_tanh(gate) * up.

Gemma 2 and 3 (`hidden_activation="gelu_pytorch_tanh"`) compute
down_proj(gelu(gate_proj(x), approximate="tanh") * up_proj(x)); this is SwiGLU's kernel
(`kernels/swiglu.py`) with the tanh-approximated GELU in place of SiLU. Both directions compute
in fp32 and store in the input dtype; the backward recomputes the activation from `gate`.
tanh is written as 2 * sigmoid(2z) - 1, which every Triton backend has.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from baton.kernels._triton import tl, triton  # stand-ins when triton is absent
from baton.kernels.dispatch import check_launchable
from baton.kernels.guard import on_tensor_device

_BLOCK = 1024
_K = math.sqrt(2.0 / math.pi)  # gelu's tanh approximation: tanh(_K * (g + _C * g^3))
_C = 0.044715
GELU_TANH_ACTIVATIONS: frozenset[str] = frozenset({"gelu_pytorch_tanh", "gelu_new",
                                                   "gelu_fast"})


def geglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch, as HF's Gemma MLP computes it: act_fn(gate_proj(x)) * up_proj(x)."""
    return F.gelu(gate, approximate="tanh") * up


@triton.jit
def _tanh(z):
    # Clamped: tanh is +-1 to fp32 precision past |z| = 10, and exp(-2z) stays finite.
    z = tl.minimum(tl.maximum(z, -15.0), 15.0)
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@triton.jit
def _geglu_fwd_kernel(H, GATE, UP, n_elements, K: tl.constexpr, C: tl.constexpr,
                      BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    t = _tanh(K * (g + C * g * g * g))
    tl.store(H + offs, (0.5 * g * (1.0 + t) * u).to(H.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd_kernel(DGATE, DUP, DH, GATE, UP, n_elements, K: tl.constexpr, C: tl.constexpr,
                      BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    t = _tanh(K * (g + C * g * g * g))
    act = 0.5 * g * (1.0 + t)
    # d gelu_tanh(g)/dg = 0.5 (1 + t) + 0.5 g (1 - t^2) K (1 + 3 C g^2)
    dact = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * K * (1.0 + 3.0 * C * g * g)
    tl.store(DGATE + offs, (dh * u * dact).to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + offs, (dh * act).to(DUP.dtype.element_ty), mask=mask)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _check_shapes(*tensors: torch.Tensor) -> None:
    if any(t.shape != tensors[0].shape for t in tensors):
        shapes = [tuple(t.shape) for t in tensors]
        raise ValueError(f"GeGLU operands must share one shape, got {shapes}.")


@on_tensor_device
def geglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """h = gelu_tanh(gate) * up, in gate's dtype and shape."""
    _check_shapes(gate, up)
    check_launchable(gate)
    gate, up = _flat(gate), _flat(up)
    h = torch.empty_like(gate)
    n = gate.numel()
    _geglu_fwd_kernel[(triton.cdiv(n, _BLOCK),)](h, gate, up, n, K=_K, C=_C, BLOCK=_BLOCK)
    return h


@on_tensor_device
def geglu_bwd(dh: torch.Tensor, gate: torch.Tensor,
              up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (dgate, dup) of h = gelu_tanh(gate) * up."""
    _check_shapes(dh, gate, up)
    check_launchable(gate)
    dh, gate, up = _flat(dh), _flat(gate), _flat(up)
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    _geglu_bwd_kernel[(triton.cdiv(n, _BLOCK),)](dgate, dup, dh, gate, up, n, K=_K, C=_C,
                                                 BLOCK=_BLOCK)
    return dgate, dup


class GeGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return geglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        gate, up = ctx.saved_tensors
        return geglu_bwd(dh, gate, up)


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton GeGLU with autograd; same result as `geglu_reference`."""
    return GeGLUFunction.apply(gate, up)
