"""The fused paths under autocast, as a session runs them: fp32 residual stream and adapters,
the matmuls in fp16 (a T4's precision) or bf16 (sm_80 and newer), against their references
under the same autocast, forward and every gradient.

`autocast` is the test device's (tests/native_device.py): CPU autocast in CI, CUDA autocast
when `make gpu-check` runs this file natively on a GPU; there bf16 is skipped below sm_80.
Tolerances are test_kernels_lora.py's (max error relative to the largest reference value:
fp16 4e-3, bf16 3e-2: where the fused path rounds differs, it keeps [tokens, r] products and
recomputes) and, for the cross-entropy, fp16 5e-3 and bf16 2e-2 relative to max(1, |ref|)
(logits rounded to the compute dtype on both sides, the softmax in fp32).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported; gpu_check sets 0

import pytest  # noqa: E402
import torch  # noqa: E402

from baton.kernels.cross_entropy import (  # noqa: E402
    fused_linear_cross_entropy,
    linear_cross_entropy_reference,
)
from baton.kernels.lora import (  # noqa: E402
    lora_linear,
    lora_linear_reference,
    lora_mlp,
    lora_mlp_reference,
    lora_qkv,
    lora_qkv_reference,
)
from tests.native_device import autocast  # noqa: E402
from tests.test_kernels_lora import _compare, _projection, _twin, _x  # noqa: E402

AUTOCAST = [torch.float16, torch.bfloat16]
CE_TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _case(kind: str):
    """(fused fn, reference fn, projections, input shape) for one fused LoRA function."""
    if kind == "linear":
        return (lambda x, p: [lora_linear(x, *p)], lambda x, p: [lora_linear_reference(x, *p)],
                [_projection(21, 64, 48, torch.float32, bias=True)], (3, 5, 64))
    if kind == "qkv":  # GQA widths, Qwen2's biases
        projs = [_projection(s, 64, d, torch.float32, bias=True)
                 for s, d in ((22, 64), (23, 32), (24, 32))]
        return (lambda x, p: list(lora_qkv(x, *p)), lambda x, p: list(lora_qkv_reference(x, *p)),
                projs, (2, 7, 64))
    projs = [_projection(25, 64, 128, torch.float32), _projection(26, 64, 128, torch.float32),
             _projection(27, 128, 64, torch.float32)]
    return (lambda x, p: [lora_mlp(x, *p)], lambda x, p: [lora_mlp_reference(x, *p)],
            projs, (13, 64))


@pytest.mark.parametrize("dtype", AUTOCAST, ids=str)
@pytest.mark.parametrize("kind", ["linear", "qkv", "mlp"])
def test_fused_lora_under_autocast_matches_reference(kind, dtype):
    fused, reference, projs, shape = _case(kind)
    refs = [_twin(p) for p in projs]
    x, x_ref = _x(shape, torch.float32), _x(shape, torch.float32)
    with autocast(dtype):
        out, ref = fused(x, projs), reference(x_ref, refs)
    assert all(o.dtype == r.dtype == dtype for o, r in zip(out, ref))
    _compare(out, ref, x, x_ref, projs, refs, dtype)  # outputs, dx, dA, dB, dbias
    assert x.grad.dtype == torch.float32  # the residual stream keeps its dtype


def _lm_head(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(41, 32, generator=g).requires_grad_()  # fp32 hidden states
    w = (0.2 * torch.randn(503, 32, generator=g)).requires_grad_()  # PEFT's fp32 lm_head
    labels = torch.randint(0, 503, (41,), generator=g)
    labels[::5] = -100
    return x, w, labels


def _loss_grads(fn, x, w, labels, dtype, **kw):
    x.grad = w.grad = None
    with autocast(dtype):
        loss = fn(x, w, labels, **kw)
    (1024.0 * loss).backward()  # a loss scale, as fp16 training has
    return loss.detach(), x.grad.clone(), w.grad.clone()


@pytest.mark.parametrize("dtype", AUTOCAST, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_fused_cross_entropy_under_autocast_matches_reference(backend, reduction, dtype):
    x, w, labels = _lm_head(31)
    got = _loss_grads(fused_linear_cross_entropy, x, w, labels, dtype, reduction=reduction,
                      chunk_size=16, backend=backend)
    want = _loss_grads(linear_cross_entropy_reference, x, w, labels, dtype, reduction=reduction)
    for name, a, b in zip(("loss", "dhidden", "dweight"), got, want):
        assert a.dtype == b.dtype == torch.float32, name
        assert b.abs().max() > 0, name
        tol = CE_TOL[dtype] * max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, atol=tol, rtol=CE_TOL[dtype],
                                   msg=lambda m: f"{name} {dtype} {reduction} {backend}: {m}")
