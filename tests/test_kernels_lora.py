"""Fused LoRA projections: forward and every gradient against the autograd reference.

The PEFT patching that routes a model through them is tested in test_kernels_lora_patch.py."""

from __future__ import annotations

import os

# Must precede the first import of a Triton kernel module (see test_kernels_nf4.py).
os.environ.setdefault("TRITON_INTERPRET", "1")

import bitsandbytes.functional as bnbf  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from baton.kernels.lora import (  # noqa: E402
    Projection,
    lora_linear,
    lora_linear_reference,
    lora_mlp,
    lora_mlp_reference,
    lora_qkv,
    lora_qkv_reference,
)
from tests.native_device import autocast  # noqa: E402

# Max error relative to the largest reference magnitude. fp32 differs only by summation order;
# fp16 and bf16 by where the fused path rounds (it keeps [tokens, r] products and recomputes).
REL_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
DTYPES = list(REL_TOL)
R = 8


def _assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, what
    scale = want.float().abs().max().clamp_min(1e-6)
    err = (got.float() - want.float()).abs().max() / scale
    assert err <= REL_TOL[dtype], f"{what}: relative error {err:.2e} > {REL_TOL[dtype]:.0e}"


def _projection(seed: int, d_in: int, d_out: int, dtype, *, bias=False, nf4=True, nested=True):
    """A LoRA projection with random NF4 (or dense) base, nonzero A and B, fp32 adapters."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=gen) / d_in**0.5
    if nf4:
        weight, state = bnbf.quantize_4bit(
            w.to(dtype), quant_type="nf4", compress_statistics=nested
        )
    else:
        weight, state = w.to(dtype), None
    a = (torch.randn(R, d_in, generator=gen) / d_in**0.5).requires_grad_()
    b = (torch.randn(d_out, R, generator=gen) / R**0.5).requires_grad_()
    b_ias = (torch.randn(d_out, generator=gen) * 0.1).to(dtype).requires_grad_() if bias else None
    return Projection(weight, state, b_ias, a, b, 1.75)


def _twin(p: Projection) -> Projection:
    """Same values, fresh leaves, so the reference's gradients land apart."""
    def leaf(t):
        return None if t is None else t.detach().clone().requires_grad_()

    a, b = leaf(p.lora_A), leaf(p.lora_B)
    return Projection(p.weight, p.quant_state, leaf(p.bias), a, b, p.scaling)


def _x(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype).requires_grad_()


def _backward(outputs, seed=1) -> None:
    """A loss touching every output with its own random weights."""
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in outputs)
    loss.backward()


def _compare(fused_out, ref_out, x, x_ref, projs, refs, dtype) -> None:
    for i, (o, r) in enumerate(zip(fused_out, ref_out)):
        _assert_close(o, r, dtype, f"output {i}")
    _backward(fused_out)
    _backward(ref_out)
    _assert_close(x.grad, x_ref.grad, dtype, "dx")
    for i, (p, q) in enumerate(zip(projs, refs)):
        _assert_close(p.lora_A.grad, q.lora_A.grad, dtype, f"dA[{i}]")
        _assert_close(p.lora_B.grad, q.lora_B.grad, dtype, f"dB[{i}]")
        assert p.lora_A.grad.dtype == torch.float32  # adapters keep their own dtype
        if p.bias is not None:
            _assert_close(p.bias.grad, q.bias.grad, dtype, f"dbias[{i}]")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nf4", [True, False], ids=["nf4", "dense"])
def test_linear_matches_reference(dtype, nf4):
    p = _projection(1, 72, 40, dtype, bias=True, nf4=nf4, nested=False)
    q = _twin(p)
    x, x_ref = _x((3, 5, 72), dtype), _x((3, 5, 72), dtype)
    _compare([lora_linear(x, p)], [lora_linear_reference(x_ref, q)], x, x_ref, [p], [q], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_qkv_matches_reference_with_biases_and_gqa(dtype):
    # Qwen2-style: biases on q, k and v; grouped-query attention: k and v narrower than q.
    projs = [_projection(s, 72, d, dtype, bias=True) for s, d in ((2, 48), (3, 24), (4, 24))]
    refs = [_twin(p) for p in projs]
    x, x_ref = _x((2, 7, 72), dtype), _x((2, 7, 72), dtype)
    _compare(lora_qkv(x, *projs), lora_qkv_reference(x_ref, *refs), x, x_ref, projs, refs, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mlp_matches_reference(dtype):
    # in_features of 64-multiples: bitsandbytes' CPU dequantization, which the reference uses,
    # mis-scales rows that straddle 64-blocks with an even length (see test_kernels_nf4.py).
    projs = [_projection(5, 64, 128, dtype), _projection(6, 64, 128, dtype),
             _projection(7, 128, 64, dtype)]
    refs = [_twin(p) for p in projs]
    x, x_ref = _x((13, 64), dtype), _x((13, 64), dtype)
    out, ref = [lora_mlp(x, *projs)], [lora_mlp_reference(x_ref, *refs)]
    _compare(out, ref, x, x_ref, projs, refs, dtype)


def test_mlp_with_biases_matches_reference():
    projs = [_projection(s, 64, 192, torch.float32, bias=True) for s in (8, 9)]
    projs.append(_projection(10, 192, 64, torch.float32, bias=True))
    refs = [_twin(p) for p in projs]
    x, x_ref = _x((2, 3, 64), torch.float32), _x((2, 3, 64), torch.float32)
    out, ref = [lora_mlp(x, *projs)], [lora_mlp_reference(x_ref, *refs)]
    _compare(out, ref, x, x_ref, projs, refs, torch.float32)


def test_autocast_runs_in_autocast_dtype():
    p = _projection(11, 64, 32, torch.float32)
    q = _twin(p)
    x, x_ref = _x((4, 64), torch.float32), _x((4, 64), torch.float32)
    with autocast(torch.bfloat16):
        out, ref = lora_linear(x, p), lora_linear_reference(x_ref, q)
    assert out.dtype == ref.dtype == torch.bfloat16
    _compare([out], [ref], x, x_ref, [p], [q], torch.bfloat16)
    assert x.grad.dtype == torch.float32


def test_forward_saves_no_dense_weight_and_only_gate_and_up():
    # Between forward and backward the fused MLP holds x, the gate and up outputs (so the
    # backward repeats no GEMM) and [tokens, r] products: never a dequantized weight, nor
    # the SwiGLU output (elementwise from gate and up, rebuilt in the backward).
    tokens, hidden, inter = 32, 64, 192
    projs = [_projection(12, hidden, inter, torch.float32),
             _projection(13, hidden, inter, torch.float32),
             _projection(14, inter, hidden, torch.float32)]
    saved: list[torch.Size] = []

    def pack(t):
        saved.append(t.shape)
        return t

    x = _x((tokens, hidden), torch.float32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lora_mlp(x, *projs)
    wide = [tuple(s) for s in saved if s.numel() > tokens * hidden]
    assert wide == [(tokens, inter), (tokens, inter)], f"saved tensors {saved}"
    assert not any(tuple(s) in {(inter, hidden), (hidden, inter)} for s in saved)
    y.sum().backward()
    assert all(p.lora_A.grad is not None for p in projs)


# --- the input gradient of Q, K and V is summed in fp32 -----------------------------------


def _dense(weight: torch.Tensor, d_in: int, d_out: int, seed: int, b_scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    a = (torch.randn(R, d_in, generator=gen) / d_in**0.5).requires_grad_()
    b = (torch.randn(d_out, R, generator=gen) / R**0.5 * b_scale).requires_grad_()
    return Projection(weight.half(), None, None, a, b, 2.0)


def _dx_exact(dys, projs) -> torch.Tensor:
    """sum_i dy_i W_i + s (dy_i B_i) A_i in fp64, from the same fp16 dy and W."""
    return sum(dy.double() @ p.weight.double()
               + p.scaling * (dy.double() @ p.lora_B.double()) @ p.lora_A.double()
               for dy, p in zip(dys, projs))


def test_qkv_input_gradient_is_summed_in_fp32_not_fp16():
    # Q's term is 1000, K's 0.3, V's -1000 on every element (B = 0: no LoRA term). Summed
    # in fp16, 1000 + 0.3 rounds to 1000.5 (fp16's step at 1000 is 0.5) and dx comes out 0.5;
    # summed in fp32, it is K's term, 0.2998 (0.3 in fp16), as autograd gives for the
    # unfused model, whose three branches meet in the fp32 residual stream.
    d = 8
    eye = torch.eye(d)
    projs = [_dense(c * eye, d, d, seed, b_scale=0.0) for seed, c in ((1, 1000.0), (2, 0.3),
                                                                       (3, -1000.0))]
    x = torch.randn(4, d).requires_grad_()
    with autocast(torch.float16):
        outs = lora_qkv(x, *projs)
    dys = [torch.ones(o.shape, dtype=torch.float16) for o in outs]
    torch.autograd.backward(outs, dys)
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, torch.full((4, d), float(torch.tensor(0.3).half())),
                               rtol=0, atol=1e-6)


def test_qkv_fp16_input_gradient_error_against_fp64():
    # Random Llama-like shapes under fp16 autocast: each matmul is rounded to fp16 once (as in
    # the unfused model); the sum adds no rounding of its own. Measured here (max error
    # relative to max |dx|): 9.3e-4 with the six terms summed in fp16, 5.1e-4 summed in fp32,
    # about one fp16 rounding (2^-11 = 4.9e-4).
    d_in, tokens = 256, 64
    gen = torch.Generator().manual_seed(0)
    projs = [_dense(torch.randn(d_out, d_in, generator=gen) / d_in**0.5, d_in, d_out, seed)
             for seed, d_out in ((1, d_in), (2, d_in // 4), (3, d_in // 4))]
    x = torch.randn(tokens, d_in, generator=gen).requires_grad_()
    with autocast(torch.float16):
        outs = lora_qkv(x, *projs)
    dys = [torch.randn(o.shape, generator=gen).half() for o in outs]
    torch.autograd.backward(outs, dys)
    want = _dx_exact(dys, projs)
    err = ((x.grad.double() - want).abs().max() / want.abs().max()).item()
    assert err < 7e-4, f"dx relative error {err:.2e} (summed in fp16: 9.3e-4)"
