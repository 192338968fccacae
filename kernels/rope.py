"""Rotary position embedding applied to Q and K, as HF's `apply_rotary_pos_emb`.

    q_embed = q * cos + rotate_half(q) * sin        (and the same for k)

with q [batch, heads, seq, head_dim] (any strides; HF passes a transposed view), cos and sin
[batch or 1, seq, head_dim]. The kernel does not assume the two halves of cos/sin are equal,
so scaled RoPE variants that HF builds into cos/sin work unchanged. The backward is the
transposed rotation, computed by the same kernel.

The result has q's (k's) dtype. HF promotes instead: bf16 q with fp32 cos/sin (an upcast
embedding under autocast) gives fp32 q_embed there; autocast casts it back to bf16 for SDPA,
so keeping q's dtype only saves that copy.
"""

from __future__ import annotations

import torch

from baton.kernels._triton import tl, triton  # stand-ins when triton is absent
from baton.kernels.dispatch import check_launchable, next_power_of_2, num_warps_for
from baton.kernels.guard import on_tensor_device

_TILE = 4096


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Plain PyTorch, the exact HF `apply_rotary_pos_emb`; with cos/sin narrower than the head
    (partial rotary, Phi-4-mini's and Phi3Config's `partial_rotary_factor`), HF Phi-3's: the
    first cos.shape[-1] dimensions rotate and the rest pass through."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    rot = cos.shape[-1]
    q_rot, q_pass, k_rot, k_pass = q[..., :rot], q[..., rot:], k[..., :rot], k[..., rot:]
    q_embed = (q_rot * cos) + (rotate_half(q_rot) * sin)
    k_embed = (k_rot * cos) + (rotate_half(k_rot) * sin)
    if rot == q.shape[-1]:
        return q_embed, k_embed
    return torch.cat([q_embed, q_pass], dim=-1), torch.cat([k_embed, k_pass], dim=-1)


@triton.jit
def _rope_kernel(
    OUT, X, COS, SIN,
    so_b, so_h, so_s, sx_b, sx_h, sx_s, sc_b, sc_s,
    seq_len, n_heads, HALF: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr,
):
    # One program per (band of BLOCK_S positions, batch), all heads at once: every head of a
    # token shares its cos/sin row, which is loaded once. Bands on grid axis 0 (up to 2^31 - 1;
    # axis 1 stops at 65,535, which a padding-free row of 131k tokens passes); positions in
    # int64, since pos * stride passes 2^31 near 524k tokens of an 8B model's q.
    b = tl.program_id(1).to(tl.int64)
    pos = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)[:, None, None]
    heads = tl.arange(0, BLOCK_H)[None, :, None]
    dims = tl.arange(0, BLOCK_D)[None, None, :]
    cs_mask = (pos < seq_len) & (dims < HALF)
    mask = cs_mask & (heads < n_heads)
    cs_off = b * sc_b + pos * sc_s + dims
    c1 = tl.load(COS + cs_off, mask=cs_mask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + cs_off + HALF, mask=cs_mask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + cs_off, mask=cs_mask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + cs_off + HALF, mask=cs_mask, other=0.0).to(tl.float32)
    x_ptr = X + b * sx_b + pos * sx_s + heads * sx_h + dims
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        # Transpose of [[c1, -s1], [s2, c2]] applied to the incoming gradient.
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    o_ptr = OUT + b * so_b + pos * so_s + heads * so_h + dims
    tl.store(o_ptr, o1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(o_ptr + HALF, o2.to(OUT.dtype.element_ty), mask=mask)


def rope_grid(batch: int, seq_len: int, block_s: int) -> tuple[int, int]:
    """(bands of block_s positions, batch): the long axis first, where CUDA allows 2^31 - 1."""
    return (-(-seq_len // block_s), batch)


def _expand_cs(t: torch.Tensor, batch: int) -> torch.Tensor:
    # contiguous() is free for HF's cos/sin; expand gives stride 0 over a broadcast batch.
    return t.contiguous().expand(batch, -1, -1)


@on_tensor_device
def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    bsz, n_heads, seq_len, head_dim = x.shape
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}.")
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if cos.shape != sin.shape or cos.shape[-2:] != (seq_len, head_dim):
        raise ValueError(
            f"cos/sin of shapes {tuple(cos.shape)}, {tuple(sin.shape)} do not fit "
            f"x {tuple(x.shape)}: expected [batch or 1, {seq_len}, {head_dim}]."
        )
    cos, sin = _expand_cs(cos, bsz), _expand_cs(sin, bsz)
    block_h, block_d = next_power_of_2(n_heads), next_power_of_2(head_dim // 2)
    # About 4k elements a program: one or two positions for an 8B model, a whole short
    # sequence for a tiny one (which keeps the CPU interpreter's launch count low).
    block_s = max(1, min(_TILE // (block_h * block_d), next_power_of_2(seq_len)))
    _rope_kernel[rope_grid(bsz, seq_len, block_s)](
        out, x, cos, sin,
        out.stride(0), out.stride(1), out.stride(2), x.stride(0), x.stride(1), x.stride(2),
        cos.stride(0), cos.stride(1), seq_len, n_heads, HALF=head_dim // 2,
        BLOCK_S=block_s, BLOCK_H=block_h, BLOCK_D=block_d, BACKWARD=backward,
        num_warps=num_warps_for(block_s * block_h * block_d),
    )
    return out


def rope_fwd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Launcher: rotate x [b, h, s, d] by cos/sin [b or 1, s, d]; returns a new tensor."""
    check_launchable(x)
    return _rotate(x, cos, sin, backward=False)


def rope_bwd(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Launcher: gradient of `rope_fwd` with respect to x."""
    check_launchable(dy)
    return _rotate(dy, cos, sin, backward=True)


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rope_fwd(q, cos, sin), rope_fwd(k, cos, sin)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        return rope_bwd(dq, cos, sin), rope_bwd(dk, cos, sin), None, None


def apply_rope(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Drop-in for HF's `apply_rotary_pos_emb` backed by the Triton kernel.

    Only the [b, h, s, d] layout (unsqueeze_dim=1, HF's default) runs the kernel; any other
    layout falls back to the reference so a caller is never silently wrong.
    """
    if unsqueeze_dim != 1 or q.dim() != 4 or cos.dim() != 3:
        return rope_reference(q, k, cos, sin, unsqueeze_dim)
    rot = cos.shape[-1]
    if rot == q.shape[-1]:
        return RoPEFunction.apply(q, k, cos.detach(), sin.detach())
    # Partial rotary: the kernel rotates the first `rot` dimensions in place of a strided view
    # (its strides are the head's), and the pass-through dimensions are concatenated back.
    q_rot, k_rot = RoPEFunction.apply(q[..., :rot], k[..., :rot], cos.detach(), sin.detach())
    return torch.cat([q_rot, q[..., rot:]], dim=-1), torch.cat([k_rot, k[..., rot:]], dim=-1)
