"""Chunked fused linear cross-entropy against full-logits F.cross_entropy, in the interpreter.

Tolerances (absolute and relative, on loss and gradients): fp32 1e-5; fp16 5e-3; bf16 2e-2.
Both sides compute logits in the input dtype and the softmax in fp32, as HF does.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported; gpu_check sets 0

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from baton.kernels.cross_entropy import (
    ce_grad_reference,
    ce_grad_triton,
    default_chunk_size,
    fused_linear_cross_entropy,
    linear_cross_entropy_reference,
)
from tests.native_device import FP32_GRAD_ATOL, autocast

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
N, H, V = 37, 24, 301  # odd sizes on purpose


def _problem(dtype, bias=True, seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, H, generator=g).to(dtype).requires_grad_()
    w = (0.2 * torch.randn(V, H, generator=g)).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(V, generator=g)).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, (n,), generator=g)
    labels[::4] = -100  # prompt tokens and padding
    return x, w, b, labels


def _run(fn, x, w, b, labels, **kw):
    params = [p for p in (x, w, b) if p is not None]
    for p in params:
        p.grad = None
    loss = fn(x, w, labels, b, **kw)
    (1.7 * loss).backward()  # a non-unit upstream gradient, as a loss scaler gives
    return [loss.detach()] + [p.grad.clone() for p in params]


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_and_gradients_match_full_logits(dtype, reduction, backend):
    x, w, b, labels = _problem(dtype)
    got = _run(fused_linear_cross_entropy, x, w, b, labels,
               reduction=reduction, chunk_size=8, backend=backend)
    want = _run(linear_cross_entropy_reference, x, w, b, labels, reduction=reduction)
    tol = TOL[dtype]
    for name, a, ref in zip(("loss", "dhidden", "dweight", "dbias"), got, want):
        assert a.dtype == ref.dtype, name
        scale = max(1.0, ref.abs().max().item())
        torch.testing.assert_close(a, ref, atol=tol * scale, rtol=tol,
                                   msg=lambda m: f"{name} {dtype} {reduction} {backend}: {m}")


def test_default_chunks_and_frozen_weight():
    # QLoRA freezes lm_head: no weight gradient is built, the hidden-state one still is.
    x, w, _, labels = _problem(torch.float32, bias=False, seed=1)
    w.requires_grad_(False)
    loss = fused_linear_cross_entropy(x, w, labels)
    loss.backward()
    assert w.grad is None
    x_grad = x.grad.clone()
    x.grad = None
    linear_cross_entropy_reference(x, w, labels).backward()
    torch.testing.assert_close(x_grad, x.grad, atol=1e-6, rtol=1e-5)


def test_softmax_spans_several_vocabulary_blocks():
    g = torch.Generator().manual_seed(2)
    logits = 4 * torch.randn(9, 301, generator=g)
    labels = torch.randint(0, 301, (9,), generator=g)
    labels[3] = -100
    a, b = logits.clone(), logits.clone()
    loss_t = ce_grad_triton(a, labels, 0.25, block=64)  # five blocks, the last partial
    loss_r = ce_grad_reference(b, labels, 0.25)
    torch.testing.assert_close(loss_t, loss_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, b, atol=FP32_GRAD_ATOL, rtol=1e-5)
    assert loss_t[3] == 0 and (a[3] == 0).all()


def test_all_ignored_mean_is_zero_not_nan():
    x, w, b, labels = _problem(torch.float32, seed=3)
    labels.fill_(-100)
    loss = fused_linear_cross_entropy(x, w, labels, b)
    loss.backward()
    assert loss.item() == 0.0
    assert (x.grad == 0).all() and (w.grad == 0).all()


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor, in bytes, any op produces (the interpreter copies byte views)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_full_logits_are_never_built(backend, dtype):
    n, chunk = 256, 64
    x, w, _, labels = _problem(dtype, bias=False, seed=4, n=n)
    with _LargestTensor() as probe:
        fused_linear_cross_entropy(x, w, labels, backend=backend, chunk_size=chunk).backward()
    fp32 = 4
    assert probe.largest < n * V * fp32, f"a tensor of {probe.largest} bytes was built"
    assert probe.largest <= max(chunk * V, V * H) * fp32


# Vocabulary and hidden sizes of the models the chunk size is chosen for.
SHAPES = {"SmolLM2-135M": (49152, 576), "Llama-3-8B": (128256, 4096),
          "Qwen2.5-7B": (152064, 3584), "Gemma-3": (262144, 3840)}


@pytest.mark.parametrize("model,rows", [("SmolLM2-135M", 1344), ("Llama-3-8B", 512),
                                        ("Qwen2.5-7B", 384), ("Gemma-3", 256)])
def test_chunks_are_sized_by_the_bytes_of_their_logits(model, rows):
    from baton.kernels.cross_entropy import LOGIT_CHUNK_BYTES, MIN_CHUNK_ROWS

    vocab, _ = SHAPES[model]
    chunk = default_chunk_size(8192, vocab)
    assert chunk == rows and chunk % 64 == 0 and chunk >= MIN_CHUNK_ROWS
    assert chunk * vocab * 4 <= max(LOGIT_CHUNK_BYTES, MIN_CHUNK_ROWS * vocab * 4)
    assert default_chunk_size(100, vocab) == 100  # a small batch is one chunk


def test_lm_head_reads_a_step_two_passes_or_three_with_fp16():
    from baton.kernels.cross_entropy import lm_head_passes

    # The review's SmolLM2 micro-batch: 490 label rows, one chunk now (was 62 chunks of 8).
    assert lm_head_passes(490, 49152, torch.float32) == 2
    assert lm_head_passes(490, 49152, torch.bfloat16) == 2
    # Llama-3-8B on a T4 (fp16) at 2,048 tokens: 4 chunks of 512, 12 reads of the 1 GB head
    # (the hidden/vocab rule gave 32 chunks of 64: 96 reads, about 96 GB a step).
    assert lm_head_passes(2048, 128256, torch.float16) == 12


@pytest.mark.parametrize("dtype,passes", [(torch.float32, 2), (torch.bfloat16, 2),
                                          (torch.float16, 3)])
def test_no_recompute_without_a_loss_scale(dtype, passes):
    # Counted, not timed: the matmul operands shaped like the weight, over a training step.
    from baton.scripts.bench_ops import count_ops

    x, w, _, labels = _problem(dtype, bias=False, seed=10, n=96)
    w.requires_grad_(False)  # QLoRA's frozen lm_head
    with count_ops(lm_head_shape=tuple(w.shape)) as ops:
        loss = fused_linear_cross_entropy(x, w, labels, chunk_size=32, backend="reference")
        loss.backward()
    assert ops.lm_head_reads == passes * 3
    assert ops.lm_head_bytes == passes * 3 * w.numel() * w.element_size()


def test_bad_reduction_is_refused():
    x, w, _, labels = _problem(torch.float32, bias=False)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(x, w, labels, reduction="none")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_no_grad_evaluation_gives_the_same_loss(reduction):
    x, w, b, labels = _problem(torch.float32, seed=5)
    with torch.no_grad():
        got = fused_linear_cross_entropy(x, w, labels, b, reduction=reduction)
        want = linear_cross_entropy_reference(x, w, labels, b, reduction=reduction)
    assert not got.requires_grad
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fp16_mean_gradients_do_not_underflow():
    # A mean over many tokens makes per-logit gradients tiny; they are scaled after the
    # matmuls, so fp16 hidden-state gradients keep the reference's precision.
    x, w, _, labels = _problem(torch.float16, bias=False, seed=6, n=200)
    got = _run(fused_linear_cross_entropy, x, w, None, labels, chunk_size=16)
    want = _run(linear_cross_entropy_reference, x.float().detach().requires_grad_(),
                w.float().detach().requires_grad_(), None, labels)
    valid = labels != -100
    assert (got[1][valid] != 0).float().mean() > 0.99 and (got[1][~valid] == 0).all()
    torch.testing.assert_close(got[1].float(), want[1], atol=1e-5, rtol=2e-2)


def test_autocast_matches_hf_under_autocast():
    # The trainer runs the model under autocast with an fp32 (upcast) lm_head: the logits
    # are then bf16 matmuls, in HF's path and in the chunked one alike.
    x, w, _, labels = _problem(torch.float32, bias=False, seed=7)
    with autocast(torch.bfloat16):
        got = _run(fused_linear_cross_entropy, x, w, None, labels, chunk_size=8, reduction="sum")
        want = _run(linear_cross_entropy_reference, x, w, None, labels, reduction="sum")
    for name, a, b in zip(("loss", "dhidden", "dweight"), got, want):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, atol=2e-2 * max(1.0, b.abs().max().item()), rtol=2e-2,
                                   msg=lambda m: f"{name}: {m}")


# --- lm_head is cast to the compute dtype once, not on every forward ---------------------


class _WeightCasts(TorchDispatchMode):
    """Counts the casts of an fp32 tensor of the weight's shape to bf16 (a cast of lm_head)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        src = args[0] if args else None
        if (func.overloadpacket is torch.ops.aten._to_copy and isinstance(src, torch.Tensor)
                and src.dtype == torch.float32 and tuple(src.shape) == self.shape
                and out.dtype == torch.bfloat16):
            self.count += 1
        return out


def _bf16_losses(x, w, labels, calls: int = 1):
    """(fused loss, full-logits reference loss) under CPU bf16 autocast, `calls` times."""
    out = []
    for _ in range(calls):
        with autocast(torch.bfloat16):
            got = fused_linear_cross_entropy(x, w, labels, chunk_size=8, backend="reference")
            want = linear_cross_entropy_reference(x, w, labels)
        out.append((got.detach(), want.detach()))
    return out


def test_lm_head_is_cast_once_and_again_only_when_it_changes():
    import gc
    import weakref

    from baton.kernels.cross_entropy import _WEIGHT_CASTS

    x, w, _, labels = _problem(torch.float32, bias=False)
    w = w.detach().requires_grad_()  # fp32, trainable: a changed weight must be seen
    casts = _WeightCasts(w.shape)
    with casts:
        first = _bf16_losses(x, w, labels, calls=3)
    # The fused path cast once for three forwards; the reference (full logits, HF's way)
    # casts on each of its three calls.
    assert casts.count == 1 + 3
    for got, want in first:
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)

    # An optimizer step changes the weight in place (its version counter moves): recast.
    loss = fused_linear_cross_entropy(x, w, labels, chunk_size=8, backend="reference")
    loss.backward()
    torch.optim.SGD([w], lr=50.0).step()
    casts.count = 0
    with casts:
        ((got, want),) = _bf16_losses(x, w, labels)
    assert casts.count == 1 + 1
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    assert abs(got.item() - first[0][0].item()) > 0.1, "the step must change the loss"

    # A new storage under the same Parameter (`.data = ...`): recast too.
    w.data = w.data * 0.5
    ((got, want),) = _bf16_losses(x, w, labels)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)

    # The copy lives no longer than its weight.
    cached = weakref.ref(_WEIGHT_CASTS[w][1])
    del w, loss  # loss's graph holds the weight's AccumulateGrad node
    gc.collect()
    assert cached() is None


def test_weight_already_in_the_compute_dtype_is_not_copied():
    from baton.kernels.cross_entropy import _WEIGHT_CASTS, cast_weight

    w = torch.randn(V, H).to(torch.bfloat16)
    assert cast_weight(w, torch.bfloat16) is w
    assert w not in _WEIGHT_CASTS


# --- fp16: the logits' gradient is scaled (by the loss scale) before it is cast ----------

U16 = 2.0**-11  # fp16's unit roundoff (11 significant bits)


def _row_128k(seed: int = 0):
    """One token of a 128k vocabulary (Llama 3's 128256, rounded to 2^17): fp16 lm_head with
    logits of about N(0, 1), an fp16 hidden state with |x| in [0.5, 1]."""
    vocab, hidden = 2**17, 64
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).half().requires_grad_()
    sign = torch.where(torch.rand(1, hidden, generator=g) < 0.5, -1.0, 1.0)
    x = (sign * (0.5 + 0.5 * torch.rand(1, hidden, generator=g))).half().requires_grad_()
    return x, w, torch.tensor([12345])


@pytest.fixture
def fp32_reductions():
    """cuBLAS may keep split-K partial sums of fp16 matmuls in fp16 unless told not to."""
    matmul = torch.backends.cuda.matmul
    old = matmul.allow_fp16_reduced_precision_reduction
    matmul.allow_fp16_reduced_precision_reduction = False
    yield
    matmul.allow_fp16_reduced_precision_reduction = old


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_fp16_gradient_of_a_128k_row_is_scaled_before_the_cast(backend, fp32_reductions):
    # Error bound, derived. With a loss scale S the logits' gradient is S (p - onehot); every
    # S p here is a normal fp16 number (checked below), so each rounding to fp16 is relative,
    # at most U16. The weight gradient of one token is dW[v, j] = g_v x_j with g the gradient
    # cast to fp16 (one rounding), the product exact in the matmul's fp32 accumulator (11 + 11
    # bits), its fp16 output rounded once more: |dW - S (p - onehot) x| <= (2 U16 + U16^2 +
    # 4e-6) |S (p - onehot) x| elementwise, where 4e-6 covers the fp32 softmax (exp of z -
    # lse, |z - lse| < 32: a few fp32 ulps of 2^-19). The hidden state's gradient sums 2^17
    # such terms: |dx - ref| <= U16 |ref| + (U16 + 2^-17) sum_v |S (p_v - onehot_v) W_v|
    # (the cast of every g_v, then an fp32 accumulation whose error grows with sqrt(vocab):
    # 2^-24 * 2^8.5 < 2^-17). Measured: dW 9.4e-4 of the 9.8e-4 allowed; dx 1.4e-4 of 5e-4.
    # Cast before scaling (the old path) most p (about 1e-5) are fp16 subnormals: their
    # relative error reaches 9e-2, a hundred times the bound.
    scale = 2.0**12
    x, w, labels = _row_128k()
    loss = fused_linear_cross_entropy(x, w, labels, reduction="sum", backend=backend)
    (loss * scale).backward()
    assert x.grad.dtype == w.grad.dtype == torch.float16

    logits = torch.nn.functional.linear(x.detach(), w.detach()).double()  # what the kernel sees
    onehot = torch.nn.functional.one_hot(labels, w.shape[0]).double()
    g_ref = scale * (torch.softmax(logits, -1) - onehot)
    dw_ref = g_ref.t() @ x.detach().double()
    assert dw_ref.abs().min() >= 2.0**-14, "the bound assumes normal fp16 values throughout"
    dw_err = ((w.grad.double() - dw_ref).abs() / dw_ref.abs()).max().item()
    assert dw_err <= 2 * U16 + U16**2 + 4e-6, f"dW relative error {dw_err:.2e}"

    dx_ref = g_ref @ w.detach().double()
    terms = g_ref.abs() @ w.detach().double().abs()
    excess = (x.grad.double() - dx_ref).abs() - U16 * dx_ref.abs() - (U16 + 2.0**-17) * terms
    assert excess.max() <= 0, f"dx outside its bound by {excess.max().item():.2e}"

    unscaled = (g_ref / scale).half().double() * scale  # the cast before the scale
    assert ((unscaled - g_ref).abs() / g_ref.abs()).max() > 50 * (2 * U16)


# --- final-logit transforms: Granite's logit scale, Gemma 2/3's softcap -----------------


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap,logit_scale", [(2.0, 1.0), (None, 0.25), (1.5, 3.0)])
def test_softcap_and_logit_scale_match_the_reference(softcap, logit_scale, dtype, backend):
    # Logits of about N(0, 5) (scaled by 3: N(0, 15)) against a cap of 1.5-2: most are in
    # tanh's bend or saturated, so a wrong derivative shows. Same tolerances as above.
    x, w, b, labels = _problem(dtype)
    with torch.no_grad():
        w.mul_(5.0)
    kw = dict(softcap=softcap, logit_scale=logit_scale, reduction="sum")
    got = _run(fused_linear_cross_entropy, x, w, b, labels, chunk_size=8, backend=backend, **kw)
    want = _run(linear_cross_entropy_reference, x, w, b, labels, **kw)
    plain = _run(linear_cross_entropy_reference, x, w, b, labels, reduction="sum")
    assert (got[0] - plain[0]).abs() > 1.0, "the transforms must change the loss"
    tol = TOL[dtype]
    for name, a, ref in zip(("loss", "dhidden", "dweight", "dbias"), got, want):
        scale = max(1.0, ref.abs().max().item())
        torch.testing.assert_close(a, ref, atol=tol * scale, rtol=tol,
                                   msg=lambda m: f"{name} {dtype} {backend}: {m}")


def test_softcap_keeps_padded_vocabulary_columns_out_of_the_softmax():
    # The kernel masks columns past the vocabulary with -inf; capped, -inf must stay -inf
    # (softcap * tanh(-inf) is -softcap, a real logit). 301 columns in blocks of 64.
    g = torch.Generator().manual_seed(8)
    logits = 4 * torch.randn(9, 301, generator=g)
    labels = torch.randint(0, 301, (9,), generator=g)
    a, b = logits.clone(), logits.clone()
    loss_t = ce_grad_triton(a, labels, 1.0, block=64, softcap=3.0, logit_scale=0.5)
    loss_r = ce_grad_reference(b, labels, 1.0, softcap=3.0, logit_scale=0.5)
    torch.testing.assert_close(loss_t, loss_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("bad", [301, 1000, -3])
def test_labels_outside_the_vocabulary_are_refused_on_the_host(bad):
    x, w, b, labels = _problem(torch.float32, seed=9)
    labels[5] = bad
    with pytest.raises(ValueError, match=rf"label {bad} is outside lm_head's vocabulary of 301"):
        fused_linear_cross_entropy(x, w, labels, b)


def test_bad_logit_transform_is_refused():
    x, w, _, labels = _problem(torch.float32, bias=False)
    for kw in (dict(logit_scale=0.0), dict(softcap=-1.0)):
        with pytest.raises(ValueError, match="logit_scale must be > 0"):
            fused_linear_cross_entropy(x, w, labels, **kw)


def test_logit_transforms_are_read_from_the_model_config():
    from transformers import Gemma2Config, GraniteConfig, LlamaConfig

    from baton.kernels.patch import logit_transforms

    assert logit_transforms(Gemma2Config(final_logit_softcapping=30.0)) == {
        "softcap": 30.0, "logit_scale": 1.0}
    assert logit_transforms(GraniteConfig(logits_scaling=8.0)) == {
        "softcap": None, "logit_scale": 0.125}
    assert logit_transforms(LlamaConfig()) == {"softcap": None, "logit_scale": 1.0}
