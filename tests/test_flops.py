"""Matmul FLOPs (scripts/bench_flops.py): the fused LoRA MLP does no more GEMM work than HF.

Counts, not timings. One NF4 + LoRA MLP of a tiny Llama under non-reentrant gradient
checkpointing, forward and backward, counted on PEFT's own path (HF + PEFT + bitsandbytes)
and on Baton's fused path (Triton interpreter); both must equal the count worked out by hand:
per projection, three base GEMMs (forward, checkpoint recompute, input gradient) and the
adapter's eight [tokens, r] GEMMs. The fused backward that recomputed gate and up counted two
base GEMMs and two adapter GEMMs more.

One adapter GEMM differs, and the test names it: torch's checkpoint stops its recompute
early, when the last tensor the backward needs has been saved; on PEFT's path that is the
down projection's x A^T, saved by autograd before the (x A^T) B^T after it runs, so HF skips
that [tokens, r] x [r, hidden] GEMM in the recompute. The fused MLP is one autograd node whose
forward runs whole (2 * tokens * r * hidden more: 0.1% of the MLP at SmolLM2's shapes).
"""

from __future__ import annotations

import os

# Must precede the first import of a Triton kernel module (see test_kernels_nf4.py).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from baton.scripts.bench_flops import count_flops  # noqa: E402

HIDDEN, INTER, R, TOKENS = 64, 192, 8, 24


@pytest.fixture(scope="module")
def mlp():
    """A Llama MLP over bitsandbytes NF4 layers with PEFT LoRA on gate, up and down (the
    one scripts/bench.py --kernel lora_mlp measures)."""
    from baton.scripts.bench_kernels import peft_mlp

    return peft_mlp(HIDDEN, INTER, R, torch.float32, torch.device("cpu"))


def _step_flops(mlp) -> int:
    """Forward and backward of the MLP under non-reentrant checkpointing, as in training."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(TOKENS, HIDDEN, generator=gen).requires_grad_()
    weights = torch.randn(TOKENS, HIDDEN, generator=gen)
    with count_flops() as flops:
        y = checkpoint(mlp, x, use_reentrant=False)
        (y * weights).sum().backward()
    assert x.grad is not None
    return flops.total


def _expected() -> int:
    total = 0
    for d_in, d_out in ((HIDDEN, INTER), (HIDDEN, INTER), (INTER, HIDDEN)):
        total += 3 * 2 * TOKENS * d_in * d_out  # forward, recompute, dx
        total += 8 * TOKENS * R * (d_in + d_out)  # x A^T and (.) B^T twice; dB, dyB, dA, dx
    return total


def test_fused_mlp_counts_the_gemm_flops_of_hf(mlp):
    from baton.kernels import lora_patch

    hf = _step_flops(mlp)
    early_stop = 2 * TOKENS * R * HIDDEN  # down's (x A^T) B^T, skipped in HF's recompute
    assert hf == _expected() - early_stop  # bitsandbytes' 4-bit forward op is counted, not 0
    assert lora_patch.patch_peft_lora(mlp, "triton") == ["base_model.model"]  # the MLP
    try:
        fused = _step_flops(mlp)
    finally:
        lora_patch.unpatch_peft_lora(mlp)
    assert fused == _expected() == hf + early_stop, f"fused {fused} FLOPs against HF's {hf}"


def test_a_4bit_linear_is_counted_like_a_dense_one():
    # The issue's shape: bitsandbytes' CPU 4-bit forward counted 0 before its formula was
    # registered; now forward and input gradient are 2 * 128 * 576 * 1536 each.
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(576, 1536, bias=False, quant_type="nf4",
                              compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(torch.randn(1536, 576) * 0.02, requires_grad=False,
                                     quant_type="nf4")
    layer = layer.to("cpu")  # quantizes
    x = torch.randn(128, 576).requires_grad_()
    with count_flops() as forward:
        y = layer(x)
    with count_flops() as backward:
        y.sum().backward()
    assert forward.total == backward.total == 2 * 128 * 576 * 1536
    assert "bitsandbytes.gemm_4bit" in forward.by_op
