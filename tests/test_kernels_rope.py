"""Triton RoPE against HF's `apply_rotary_pos_emb`, in Triton's CPU interpreter.

Tolerances (absolute and relative): fp32 1e-5; fp16 1e-2; bf16 3e-2.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported; gpu_check sets 0

import pytest
import torch

from baton.kernels.rope import apply_rope, rope_bwd, rope_fwd, rope_reference

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _cos_sin(batch, seq, dim, dtype, offset=0):
    """HF's default rotary tables: [batch, seq, dim], both halves equal."""
    pos = (torch.arange(seq) + offset).float()[None].expand(batch, -1)
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    emb = torch.cat([pos[..., None] * inv] * 2, dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _qk(batch, seq, hq, hk, dim, dtype, seed=0):
    # HF passes q and k as transposed views of [b, s, h, d]: non-contiguous on purpose.
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, hq, dim, generator=g).to(dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(batch, seq, hk, dim, generator=g).to(dtype).transpose(1, 2).requires_grad_()
    return q, k


def _run(fn, q, k, cos, sin, dq_out, dk_out):
    q.grad = k.grad = None
    qe, ke = fn(q, k, cos, sin)
    ((qe * dq_out).sum() + (ke * dk_out).sum()).backward()
    return qe.detach(), ke.detach(), q.grad.clone(), k.grad.clone()


# (batch, seq, q heads, kv heads, head_dim): GQA, odd counts; the second has several
# position bands a program (head_dim 64 with 6 heads -> 16 positions a band).
SHAPES = [(2, 5, 3, 1, 10), (1, 37, 6, 2, 64)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_gradients_match_reference(shape, dtype):
    b, s, hq, hk, d = shape
    q, k = _qk(b, s, hq, hk, d, dtype)
    cos, sin = _cos_sin(1, s, d, dtype)  # batch 1, broadcast as HF does for shared positions
    g = torch.Generator().manual_seed(3)
    dq_out = torch.randn(q.shape, generator=g).to(dtype)
    dk_out = torch.randn(k.shape, generator=g).to(dtype)
    got = _run(apply_rope, q, k, cos, sin, dq_out, dk_out)
    want = _run(rope_reference, q, k, cos, sin, dq_out, dk_out)
    tol = TOL[dtype]
    for name, a, b_ in zip(("q_embed", "k_embed", "dq", "dk"), got, want):
        assert a.shape == b_.shape and a.dtype == b_.dtype, name
        torch.testing.assert_close(a, b_, atol=tol, rtol=tol, msg=lambda m: f"{name} {dtype}: {m}")


def test_per_sample_positions_and_unequal_halves():
    # Packed or left-padded batches give each sample its own positions; scaled RoPE variants
    # may not repeat the halves: the kernel must not assume either.
    q, k = _qk(3, 6, 2, 2, 8, torch.float32, seed=4)
    g = torch.Generator().manual_seed(5)
    cos, sin = torch.randn(3, 6, 8, generator=g), torch.randn(3, 6, 8, generator=g)
    dq_out, dk_out = torch.randn(q.shape, generator=g), torch.randn(k.shape, generator=g)
    got = _run(apply_rope, q, k, cos, sin, dq_out, dk_out)
    want = _run(rope_reference, q, k, cos, sin, dq_out, dk_out)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_backward_launcher_inverts_forward_rotation():
    # With HF's tables the rotation is orthogonal: its transpose undoes it.
    x = torch.randn(2, 3, 9, 16)
    cos, sin = _cos_sin(1, 9, 16, torch.float32, offset=100)
    torch.testing.assert_close(rope_bwd(rope_fwd(x, cos, sin), cos, sin), x, atol=1e-5, rtol=1e-5)


def test_other_layouts_fall_back_to_reference():
    q = torch.randn(2, 5, 3, 8)  # [b, s, h, d] with unsqueeze_dim=2
    k = torch.randn(2, 5, 1, 8)
    cos, sin = _cos_sin(2, 5, 8, torch.float32)
    got = apply_rope(q, k, cos, sin, unsqueeze_dim=2)
    want = rope_reference(q, k, cos, sin, unsqueeze_dim=2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_odd_head_dim_is_refused():
    x = torch.randn(1, 1, 2, 7)
    cos, sin = torch.ones(1, 2, 7), torch.zeros(1, 2, 7)
    with pytest.raises(ValueError, match="even head_dim"):
        rope_fwd(x, cos, sin)


def test_launch_grid_fits_cuda_limits_for_long_padding_free_rows():
    # Plain Python, the launcher's own arithmetic: an 8B model (32 heads of 128: block_s 1)
    # on one padding-free row of a million tokens. CUDA allows 2^31 - 1 programs on grid axis
    # 0 and 65,535 on axes 1 and 2; the positions' offsets pass int32 past ~524k tokens.
    from baton.kernels.dispatch import next_power_of_2
    from baton.kernels.rope import _TILE, rope_grid

    heads, head_dim, tokens = 32, 128, 1_000_000
    block_s = max(1, min(_TILE // (next_power_of_2(heads) * head_dim // 2), tokens))
    bands, batch = rope_grid(1, tokens, block_s)
    assert block_s == 2 and bands == 500_000 and batch == 1
    assert bands <= 2**31 - 1 and batch <= 65_535
    assert rope_grid(3, 10, 4) == (3, 3)
    last_offset = (tokens - 1) * heads * head_dim  # pos * stride of q's [b, s, h, d] storage
    assert last_offset > 2**31 - 1  # why the kernel computes positions in int64
