"""SwiGLU, the gated activation of the Llama MLP: h = silu(gate) * up.

`swiglu_fwd` and `swiglu_bwd` are plain tensor functions because the fused LoRA MLP
(`kernels/lora.py`) calls them inside its own autograd Function. Both compute in fp32 and
store in the input dtype. The backward recomputes silu from `gate` instead of storing it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from baton.kernels._triton import tl, triton  # stand-ins when triton is absent
from baton.kernels.dispatch import check_launchable
from baton.kernels.guard import on_tensor_device

_BLOCK = 1024


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch, as HF's MLP computes it: act_fn(gate_proj(x)) * up_proj(x)."""
    return F.silu(gate) * up


@triton.jit
def _swiglu_fwd_kernel(H, GATE, UP, n_elements, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DGATE, DUP, DH, GATE, UP, n_elements, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    # d silu(g)/dg = sig * (1 + g * (1 - sig))
    dg = dh * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DGATE + offs, dg.to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + offs, (dh * silu).to(DUP.dtype.element_ty), mask=mask)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _check_shapes(*tensors: torch.Tensor) -> None:
    shape = tensors[0].shape
    if any(t.shape != shape for t in tensors):
        shapes = [tuple(t.shape) for t in tensors]
        raise ValueError(f"SwiGLU operands must share one shape, got {shapes}.")


@on_tensor_device
def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """h = silu(gate) * up, in gate's dtype and shape."""
    _check_shapes(gate, up)
    check_launchable(gate)
    gate, up = _flat(gate), _flat(up)
    h = torch.empty_like(gate)
    n = gate.numel()
    _swiglu_fwd_kernel[(triton.cdiv(n, _BLOCK),)](h, gate, up, n, BLOCK=_BLOCK)
    return h


@on_tensor_device
def swiglu_bwd(
    dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, inplace: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (dgate, dup) of h = silu(gate) * up.

    With `inplace=True` the results overwrite `gate` and `up` (each element is read before
    it is written), which saves two activation-sized buffers when the caller no longer needs
    them; only valid for contiguous gate and up.
    """
    _check_shapes(dh, gate, up)
    check_launchable(gate)
    dh = _flat(dh)
    if inplace and not (gate.is_contiguous() and up.is_contiguous()):
        raise ValueError("swiglu_bwd(inplace=True) needs contiguous gate and up.")
    gate, up = _flat(gate), _flat(up)
    dgate = gate if inplace else torch.empty_like(gate)
    dup = up if inplace else torch.empty_like(up)
    n = gate.numel()
    _swiglu_bwd_kernel[(triton.cdiv(n, _BLOCK),)](dgate, dup, dh, gate, up, n, BLOCK=_BLOCK)
    return dgate, dup


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        gate, up = ctx.saved_tensors
        return swiglu_bwd(dh, gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton SwiGLU with autograd; same result as `swiglu_reference`."""
    return SwiGLUFunction.apply(gate, up)
