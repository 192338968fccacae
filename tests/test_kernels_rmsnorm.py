"""Triton RMSNorm against the HF-exact reference, in Triton's CPU interpreter.

Tolerances (absolute and relative): fp32 1e-5; fp16 1e-2; bf16 3e-2 (one or two units in the
last place: the kernel rounds once where the reference rounds after each op).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported; gpu_check sets 0

import pytest
import torch

from baton.kernels.rmsnorm import rmsnorm, rmsnorm_bwd, rmsnorm_fwd, rmsnorm_reference

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Odd widths; (2, 11, 1000) gives several row tiles a backward program (1000 -> 4 rows a tile).
SHAPES = [(3, 7, 67), (2, 11, 1000), (5, 1)]


def _inputs(shape, dtype, weight_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    w = (1.0 + 0.1 * torch.randn(shape[-1], generator=g)).to(weight_dtype or dtype).requires_grad_()
    return x, w


def _run(fn, x, w, dy, eps=1e-6):
    x.grad = w.grad = None
    y = fn(x, w, eps)
    y.backward(dy)
    return y.detach(), x.grad.clone(), w.grad.clone()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_gradients_match_reference(shape, dtype):
    x, w = _inputs(shape, dtype)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = _run(rmsnorm, x, w, dy)
    want = _run(rmsnorm_reference, x, w, dy)
    tol = TOL[dtype]
    for name, a, b in zip(("y", "dx", "dweight"), got, want):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m: f"{name} {dtype}: {m}")


def test_fp32_weight_on_bf16_input_promotes_like_hf():
    # PEFT's prepare_model_for_kbit_training keeps norm weights fp32 over bf16 activations.
    x, w = _inputs((4, 33), torch.bfloat16, weight_dtype=torch.float32)
    dy = torch.randn(4, 33, generator=torch.Generator().manual_seed(2))
    got = _run(rmsnorm, x, w, dy)
    want = _run(rmsnorm_reference, x, w, dy)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.float32
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2)


def test_launchers_accept_strided_rows_and_return_fp32_rstd():
    base = torch.randn(6, 50)
    x = base[:, :40]  # rows with a stride larger than their width
    w = torch.rand(40) + 0.5
    y, rstd = rmsnorm_fwd(x, w, 1e-5)
    assert rstd.dtype == torch.float32 and rstd.shape == (6,)
    torch.testing.assert_close(y, rmsnorm_reference(x, w, 1e-5), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rstd, torch.rsqrt(x.pow(2).mean(-1) + 1e-5), atol=1e-5, rtol=1e-5)
    dx, dw = rmsnorm_bwd(torch.ones_like(y), x, w, rstd)
    assert dx.shape == x.shape and dw.shape == w.shape and torch.isfinite(dx).all()
