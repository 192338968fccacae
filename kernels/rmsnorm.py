"""RMSNorm in the casts of each family's HF module; also the QK-norm of Qwen3, OLMo 2 and Gemma 3,
which are RMSNorm modules of the same class over each head (or the whole projection).

Llama's (most families), statistics in fp32, weight multiply in the input dtype:

    y = weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)

with the output dtype PyTorch's promotion of (weight, x), as HF does: a fp32 weight on bf16
activations (PEFT's `prepare_model_for_kbit_training`) gives fp32 output. `cast_after=True`
(OLMo 2, GPT-OSS, Gemma) multiplies in fp32 and casts the product to x's dtype instead, and
`offset=1.0` is Gemma's (1 + weight) scale, whose weight is stored around 0:

    y = ((offset + weight.float()) * x.float() * rsqrt(...)).to(x.dtype)

The backward treats the casts as identity (as autograd does); d y / d weight does not depend on
the offset.
"""

from __future__ import annotations

import torch

from baton.kernels._triton import tl, triton  # stand-ins when triton is absent
from baton.kernels.dispatch import check_launchable, next_power_of_2, num_warps_for
from baton.kernels.guard import on_tensor_device

_MAX_FUSED = 65536  # widest row one program holds in registers
_TILE = 4096  # elements a program holds at once


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                      cast_after: bool = False) -> torch.Tensor:
    """Plain PyTorch, the exact HF forward: LlamaRMSNorm's by default, OLMo 2's with
    `cast_after`, Gemma's with `offset=1.0, cast_after=True`."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    if cast_after:
        return ((offset + weight.float()) * h).to(input_dtype)
    return (weight + offset if offset else weight) * h.to(input_dtype)


@triton.jit
def _rmsnorm_fwd_kernel(
    Y, X, W, RSTD, stride_y, stride_x, n_rows, n_cols, eps, offset,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, CAST_AFTER: tl.constexpr,
):
    # A program normalises BLOCK_R whole rows: one row for wide models, many for narrow ones.
    row_ids = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rows = row_ids[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    x = tl.load(X + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    tl.store(RSTD + row_ids, rstd, mask=row_ids < n_rows)
    normed = x * rstd[:, None]
    if not CAST_AFTER:
        # Round the normalised row to the input dtype before the weight multiply, as Llama does.
        normed = normed.to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32) + offset
    tl.store(Y + rows * stride_y + cols, (w * normed).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_bwd_kernel(
    DX, DW_PARTIAL, DY, X, W, RSTD, stride_dx, stride_dy, stride_x,
    n_rows, n_cols, rows_per_program, offset, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Each program walks a contiguous band of rows, BLOCK_R at a time, and keeps its own fp32
    # dW partial sum; the launcher adds the partials: no atomics, a deterministic result.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)[None, :]
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32) + offset
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    band_start = pid * rows_per_program
    band_end = tl.minimum(band_start + rows_per_program, n_rows)
    for start in range(band_start, band_end, BLOCK_R):
        rows = (start + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
        mask = (rows < band_end) & col_ok
        x = tl.load(X + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rows < band_end, other=0.0)
        normed = x * rstd
        dw_acc += tl.sum(dy * normed, axis=0)
        dyw = dy * w
        dx = rstd * (dyw - normed * (tl.sum(dyw * normed, axis=1)[:, None] / n_cols))
        tl.store(DX + rows * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    out_cols = tl.arange(0, BLOCK_N)
    tl.store(DW_PARTIAL + pid * n_cols + out_cols, dw_acc, mask=out_cols < n_cols)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _blocks(n_rows: int, n_cols: int) -> tuple[int, int]:
    """(rows a tile, columns a tile): about _TILE elements, whole rows."""
    block_n = next_power_of_2(n_cols)
    if block_n > _MAX_FUSED:
        raise ValueError(
            f"RMSNorm over {n_cols} features is wider than {_MAX_FUSED}; use rmsnorm_reference."
        )
    block_r = max(1, min(_TILE // block_n, next_power_of_2(n_rows)))
    return block_r, block_n


@on_tensor_device
def rmsnorm_fwd(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
    cast_after: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher: returns (y with x's shape, rstd [rows] fp32)."""
    check_launchable(x)
    x2 = _rows(x)
    n_rows, n_cols = x2.shape
    out_dtype = x.dtype if cast_after else torch.promote_types(weight.dtype, x.dtype)
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block_r, block_n = _blocks(n_rows, n_cols)
    _rmsnorm_fwd_kernel[(triton.cdiv(n_rows, block_r),)](
        y, x2, weight, rstd, y.stride(0), x2.stride(0), n_rows, n_cols, eps, float(offset),
        BLOCK_R=block_r, BLOCK_N=block_n, CAST_AFTER=bool(cast_after), num_warps=num_warps_for(block_r * block_n),
    )
    return y.view(*x.shape[:-1], n_cols), rstd


def _num_programs(device: torch.device, n_rows: int) -> int:
    if device.type == "cuda":
        target = torch.cuda.get_device_properties(device).multi_processor_count * 4
    else:
        target = 2  # interpreter: few programs, each looping over rows
    return max(1, min(n_rows, target))


@on_tensor_device
def rmsnorm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
    offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher: returns (dx in x's dtype and shape, dweight in weight's dtype)."""
    check_launchable(x)
    x2, dy2 = _rows(x), _rows(dy)
    n_rows, n_cols = x2.shape
    block_r, block_n = _blocks(n_rows, n_cols)
    programs = _num_programs(x.device, n_rows)
    rows_per_program = -(-n_rows // programs)
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x.device)
    _rmsnorm_bwd_kernel[(programs,)](
        dx, dw_partial, dy2, x2, weight, rstd, dx.stride(0), dy2.stride(0), x2.stride(0),
        n_rows, n_cols, rows_per_program, float(offset), BLOCK_R=block_r, BLOCK_N=block_n,
        num_warps=num_warps_for(block_r * block_n),
    )
    return dx.view(x.shape), dw_partial.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                cast_after: bool = False) -> torch.Tensor:
        y, rstd = rmsnorm_fwd(x, weight, eps, offset, cast_after)
        ctx.save_for_backward(x, weight, rstd)
        ctx.offset = offset
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rmsnorm_bwd(dy, x, weight, rstd, ctx.offset)
        return dx, (dw if ctx.needs_input_grad[1] else None), None, None, None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
            cast_after: bool = False) -> torch.Tensor:
    """Triton RMSNorm with autograd; same result as `rmsnorm_reference`."""
    return RMSNormFunction.apply(x, weight, eps, offset, cast_after)
