"""Triton SwiGLU against silu(gate) * up, in Triton's CPU interpreter.

Tolerances (absolute and relative): fp32 1e-5; fp16 1e-2; bf16 3e-2 (the reference rounds
silu(gate) to the dtype before the product; the kernel rounds once).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported; gpu_check sets 0

import pytest
import torch

from baton.kernels.swiglu import swiglu, swiglu_bwd, swiglu_fwd, swiglu_reference

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(3, 7, 129), (1, 1, 5)]  # 2709 elements: three programs, the last one partial


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate = (3 * torch.randn(shape, generator=g)).to(dtype).requires_grad_()  # both silu tails
    up = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    dh = torch.randn(shape, generator=g).to(dtype)
    return gate, up, dh


def _run(fn, gate, up, dh):
    gate.grad = up.grad = None
    h = fn(gate, up)
    h.backward(dh)
    return h.detach(), gate.grad.clone(), up.grad.clone()


def _close(a, b, dtype, name):
    # Relative to the tensor's scale: bf16 products of |gate| ~ 9 carry ulps of 0.06.
    tol = TOL[dtype]
    torch.testing.assert_close(a.float(), b.float(), atol=tol * max(1.0, b.abs().max().item() / 4),
                               rtol=tol, msg=lambda m: f"{name} {dtype}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_gradients_match_reference(shape, dtype):
    gate, up, dh = _inputs(shape, dtype)
    got = _run(swiglu, gate, up, dh)
    want = _run(swiglu_reference, gate, up, dh)
    for name, a, b in zip(("h", "dgate", "dup"), got, want):
        assert a.dtype == b.dtype == dtype, name
        _close(a, b, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_launchers_match_autograd_of_reference(dtype):
    # The fused LoRA MLP (kernels/lora.py) calls these two directly.
    gate, up, dh = _inputs((4, 37), dtype, seed=1)
    want = _run(swiglu_reference, gate, up, dh)
    g, u = gate.detach(), up.detach()
    _close(swiglu_fwd(g, u), want[0], dtype, "h")
    dgate, dup = swiglu_bwd(dh, g, u)
    _close(dgate, want[1], dtype, "dgate")
    _close(dup, want[2], dtype, "dup")


def test_inplace_backward_overwrites_gate_and_up():
    gate, up, dh = _inputs((5, 21), torch.float32, seed=2)
    want = _run(swiglu_reference, gate, up, dh)
    g, u = gate.detach().clone(), up.detach().clone()
    dgate, dup = swiglu_bwd(dh, g, u, inplace=True)
    assert dgate.data_ptr() == g.data_ptr() and dup.data_ptr() == u.data_ptr()
    torch.testing.assert_close(dgate, want[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dup, want[2], atol=1e-5, rtol=1e-5)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="share one shape"):
        swiglu_fwd(torch.randn(2, 3), torch.randn(3, 2))
