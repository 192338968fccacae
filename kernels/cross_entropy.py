"""Chunked fused linear cross-entropy: loss of softmax(hidden @ weight.T) without full logits.

The hidden states are multiplied by the lm_head weight one chunk of rows at a time; each
chunk's fp32 logits live only while its loss (forward) or its gradient (backward) is taken.
So a 128k-vocabulary model never holds [tokens, vocab] fp32 logits: the peak is one chunk.

Chunks are sized by the bytes of their fp32 logits (`LOGIT_CHUNK_BYTES`, with a floor of
`MIN_CHUNK_ROWS`), not by the hidden/vocabulary ratio: every chunk reads the whole lm_head
weight once a pass (1 GB for a 128k x 4k bf16 head), so a chunk of 8 rows made the loss
bandwidth-bound, reading the weight some 180 times a step where HF reads it 2 or 3 times.

Where no loss scaler is in play (fp32, bf16) the gradient is built in the forward, chunk by
chunk (Liger-Kernel's way): the logits' gradient exists right after the loss, so dx and dW
come from the same chunk's logits and the backward only multiplies them by the incoming
gradient. Two passes over lm_head (logits, dx), not three. fp16 recomputes each chunk's
logits in the backward instead, because only the backward knows the incoming gradient, which
carries the fp16 loss scale: the logits' gradient (softmax - onehot) is multiplied by it in
fp32 *before* it is cast to the compute dtype for the matmuls: with a 128k vocabulary most
probabilities are about 1e-5, subnormal in fp16 (below 6.1e-5), where a cast keeps a few bits
or none; scaled by the loss scale (2^16 at the start, over the step's tokens) they are normal
numbers that keep fp16's 11 bits, as in HF's unfused path, which casts the same scaled
gradient. A factor below 1 (a mean without a loss scale: a test) is applied after the matmuls
instead, in fp32, where it cannot push the values down into fp16's subnormals. bf16 has
fp32's exponent range: its gradient, scaled by 1/n of a mean, loses nothing to the cast.

The Triton part is the per-row softmax / cross-entropy-gradient kernel over a chunk's logits,
written in place. `backend="reference"` does the same chunking with plain torch ops, which
saves the same memory on devices without Triton (P100, CPU).

Semantics match `torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index)`
with logits computed in the weight's dtype, as HF's `ForCausalLMLoss` does, except one case:
a "mean" over zero non-ignored tokens is 0 (torch gives nan), so that a fully masked
micro-batch cannot poison an optimizer step.

Two optional transforms of the fp32 logits z, in this order, before the softmax:
`logit_scale` multiplies them (Granite's `logits / config.logits_scaling` is
`logit_scale = 1 / logits_scaling`), then `softcap` caps them, z = softcap * tanh(z / softcap)
(Gemma 2 and 3's `final_logit_softcapping`). Their derivative,
logit_scale * (1 - tanh^2), multiplies the logits' gradient in the same fp32 pass.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from baton.kernels._triton import tl, triton  # stand-ins when triton is absent
from baton.kernels.dispatch import check_launchable, next_power_of_2, num_warps_for
from baton.kernels.guard import on_tensor_device

IGNORE_INDEX = -100
REDUCTIONS = ("mean", "sum")
_TILE = 4096  # logits a program holds at once
# One chunk's fp32 logits: 256 MiB is 1,365 rows of SmolLM2's 49,152-token vocabulary, 523 of
# Llama 3's 128,256, 441 of Qwen2.5's 152,064 (rounded down to 64-row tiles); its 16-bit
# copy adds half as much. HF's full logits of 2,048 tokens at 128k are 1 GiB in fp32.
LOGIT_CHUNK_BYTES = 256 * 2**20
MIN_CHUNK_ROWS = 256  # a floor for huge vocabularies: the weight's reads stay few


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> torch.Tensor:
    """Plain PyTorch, unchunked: full logits, as HF builds them (then scaled and capped)."""
    logits = F.linear(hidden.to(weight.dtype), weight, bias).float() * logit_scale
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    if reduction == "mean" and not bool((labels != ignore_index).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


@triton.jit
def _capped(x, logit_scale, softcap, SOFTCAP: tl.constexpr):
    """(z, dz/dx) of z = softcap * tanh(logit_scale * x / softcap), or of logit_scale * x."""
    z = x * logit_scale
    dz = logit_scale + 0.0 * x
    if SOFTCAP:
        # tanh from one exp of a non-positive argument: no overflow, |error| ~ 1e-7.
        e = tl.exp(-2.0 * tl.abs(z / softcap))
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(z < 0, -t, t)
        z = softcap * t
        dz = logit_scale * (1.0 - t * t)
    return z, dz


@triton.jit
def _ce_grad_kernel(
    LOGITS, LABELS, LOSS, stride_row, n_rows, n_cols, scale, ignore_index,
    logit_scale, softcap,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, SOFTCAP: tl.constexpr,
):
    # A program takes BLOCK_R rows (one for a large vocabulary, several for a small one).
    # Pass 1: online max and sum of exponentials (logsumexp) over vocabulary blocks.
    # Pass 2: overwrite the logits with d loss / d logits = (softmax - onehot) * scale.
    row_ids = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = row_ids < n_rows
    label = tl.load(LABELS + row_ids, mask=row_ok, other=ignore_index)
    valid = row_ok & (label != ignore_index)
    rows = row_ids[:, None]
    cols = tl.arange(0, BLOCK_V)[None, :]
    ptr = LOGITS + rows * stride_row
    run_max = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_R,), tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        mask = row_ok[:, None] & (start + cols < n_cols)
        x = tl.load(ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, _capped(x, logit_scale, softcap, SOFTCAP)[0], float("-inf"))
        new_max = tl.maximum(run_max, tl.max(x, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows past the end
        block_sum = tl.sum(tl.exp(x - safe_max[:, None]), axis=1)
        run_sum = run_sum * tl.exp(run_max - safe_max) + block_sum
        run_max = new_max
    lse = tl.where(row_ok, run_max + tl.log(tl.where(row_ok, run_sum, 1.0)), 0.0)
    safe_label = tl.where(valid, label, 0)
    target = tl.load(ptr + safe_label[:, None], mask=valid[:, None], other=0.0).to(tl.float32)
    target = _capped(target, logit_scale, softcap, SOFTCAP)[0]
    tl.store(LOSS + row_ids, tl.where(valid, lse - tl.sum(target, axis=1), 0.0), mask=row_ok)
    row_scale = tl.where(valid, scale, 0.0)[:, None]
    for start in range(0, n_cols, BLOCK_V):
        mask = row_ok[:, None] & (start + cols < n_cols)
        x = tl.load(ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
        z, dz = _capped(x, logit_scale, softcap, SOFTCAP)
        onehot = tl.where(start + cols == label[:, None], 1.0, 0.0)
        grad = (tl.exp(z - lse[:, None]) - onehot) * row_scale * dz
        tl.store(ptr + start + cols, grad, mask=mask)


@on_tensor_device
def ce_grad_triton(logits: torch.Tensor, labels: torch.Tensor, scale: float,
                   ignore_index: int = IGNORE_INDEX, block: int | None = None, *,
                   softcap: float | None = None, logit_scale: float = 1.0) -> torch.Tensor:
    """Launcher: per-row CE loss [rows]; overwrites fp32 `logits` [rows, vocab] with its gradient.

    `block` caps the vocabulary block (tests use a small one to exercise the online softmax).
    `softcap`, `logit_scale`: see the module's docstring.
    """
    check_launchable(logits)
    if logits.dtype != torch.float32 or logits.stride(-1) != 1:
        raise ValueError("ce_grad_triton needs contiguous-row fp32 logits.")
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    block_v = min(next_power_of_2(n_cols), block or _TILE)
    block_r = max(1, min(_TILE // block_v, next_power_of_2(n_rows)))
    _ce_grad_kernel[(triton.cdiv(n_rows, block_r),)](
        logits, labels.contiguous(), loss, logits.stride(0), n_rows, n_cols, scale, ignore_index,
        float(logit_scale), float(softcap or 1.0),
        BLOCK_R=block_r, BLOCK_V=block_v, SOFTCAP=bool(softcap),
        num_warps=num_warps_for(block_r * block_v),
    )
    return loss


def ce_grad_reference(logits: torch.Tensor, labels: torch.Tensor, scale: float,
                      ignore_index: int = IGNORE_INDEX, block: int | None = None, *,
                      softcap: float | None = None, logit_scale: float = 1.0) -> torch.Tensor:
    """Same contract as `ce_grad_triton`, in plain torch (for P100, CPU and tests)."""
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    dz = None
    if logit_scale != 1.0:
        logits.mul_(logit_scale)
    if softcap:
        tanh = logits.div_(softcap).tanh_()
        dz = (1.0 - tanh * tanh).mul_(logit_scale)
        logits = tanh.mul_(softcap)
    lse = torch.logsumexp(logits, dim=-1)
    loss = (lse - logits.gather(1, safe[:, None]).squeeze(1)) * valid
    logits.sub_(lse[:, None]).exp_()
    logits.scatter_add_(1, safe[:, None], -torch.ones_like(logits[:, :1]))
    row_scale = (valid.to(logits.dtype) * scale)[:, None]
    if dz is not None:
        logits.mul_(dz)
    elif logit_scale != 1.0:
        row_scale = row_scale * logit_scale
    logits.mul_(row_scale)
    return loss


def default_chunk_size(n_rows: int, vocab_size: int,
                       budget: int = LOGIT_CHUNK_BYTES) -> int:
    """Rows a chunk: as many as fit `budget` bytes of fp32 logits, in whole 64-row tiles,
    at least MIN_CHUNK_ROWS, at most `n_rows` (a small batch is one chunk)."""
    rows = max(MIN_CHUNK_ROWS, budget // (4 * vocab_size) // 64 * 64)
    return max(1, min(rows, n_rows))


def lm_head_passes(n_rows: int, vocab_size: int, dtype: torch.dtype,
                   chunk_size: int | None = None) -> int:
    """Times a training step's loss reads the whole lm_head weight: once a chunk for the
    logits and once for dx, plus once a chunk for the fp16 recompute."""
    chunk = chunk_size or default_chunk_size(n_rows, vocab_size)
    chunks = -(-n_rows // chunk)
    return chunks * (3 if dtype == torch.float16 else 2)


# weight -> ((version, data_ptr, dtype), the weight cast to that dtype). Weak keys compared
# by identity (a tensor's == is elementwise): an entry goes with its weight. One entry a
# weight: the latest compute dtype.
_WEIGHT_CASTS = WeakIdKeyDictionary()


def cast_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` in `dtype`, cast once and reused while the weight is unchanged.

    PEFT's `prepare_model_for_kbit_training` leaves lm_head in fp32 while autocast computes in
    bf16 or fp16: without this, every forward copied a 128k x 4k lm_head (1 GiB in bf16). The
    copy is kept beside the weight instead (the same bytes the transient copy took, now held
    between steps) and made again when the weight changes: the key holds the weight's version
    counter (bumped by any in-place change autograd can see: an optimizer step,
    `load_state_dict`, `copy_` under no_grad), its storage address (a new `.data`) and the
    dtype. A weight already in `dtype` is returned as it is, with nothing cached.
    """
    if weight.dtype == dtype:
        return weight
    key = (weight._version, weight.data_ptr(), dtype)
    hit = _WEIGHT_CASTS.get(weight)
    if hit is not None and hit[0] == key:
        return hit[1]
    _WEIGHT_CASTS.pop(weight, None)  # free the stale copy before making the new one
    with torch.no_grad():
        cast = weight.detach().to(dtype)
    _WEIGHT_CASTS[weight] = (key, cast)
    return cast


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype HF's lm_head matmul runs in: autocast's when it is on, else the weight's."""
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def _chunks(hidden, weight, chunk_size):
    chunk = chunk_size or default_chunk_size(hidden.shape[0], weight.shape[0])
    return [slice(start, start + chunk) for start in range(0, hidden.shape[0], chunk)]


def _ce_grad_fn(backend: str, softcap: float | None, logit_scale: float):
    """The per-chunk loss-and-gradient op of `backend`, with the logits' transforms bound."""
    ce_grad = ce_grad_triton if backend == "triton" else ce_grad_reference
    return functools.partial(ce_grad, softcap=softcap, logit_scale=logit_scale)


def _split(factor: float) -> tuple[float, float]:
    """(before the cast, after the matmuls): a factor of 1 or more (a loss scale) goes before,
    where it lifts the gradient out of fp16's subnormals; one below 1 after, in fp32."""
    return (factor, 1.0) if abs(factor) >= 1.0 else (1.0, factor)


def _chunked_grads(hidden, weight, bias, labels, needs, ce_grad, dtype, chunk_size,
                   ignore_index, factor: float):
    """(summed loss, dx, dw, db) of `factor` x the summed loss, chunk by chunk, the logits in
    `dtype` (autocast's or the weight's): the weight is cast once (`cast_weight`: not once a
    chunk, nor once a forward while it is unchanged), and the chunks run with autocast off.

    The gradient of the logits is made in fp32, multiplied by `factor` when that is at least
    1 (a loss scale), and only then cast to the compute dtype: see the module's docstring.
    Weight and bias gradients sum in fp32. `needs` is (dx, dw, db) wanted.
    """
    pre, post = _split(factor)
    w = cast_weight(weight, dtype)
    b = None if bias is None else bias.to(dtype)
    dx = torch.empty_like(hidden) if needs[0] else None
    dw = torch.zeros_like(weight, dtype=torch.float32) if needs[1] else None
    db = torch.zeros_like(bias, dtype=torch.float32) if needs[2] else None
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    with torch.autocast(weight.device.type, enabled=False):
        for rows in _chunks(hidden, weight, chunk_size):
            x_chunk = hidden[rows].to(dtype)
            logits = F.linear(x_chunk, w, b).float()
            total += ce_grad(logits, labels[rows], pre, ignore_index).sum()  # in place
            if not any(needs):  # the loss alone (evaluation, the fp16 forward)
                continue
            g = logits.to(dtype)
            if dx is not None:
                dx[rows] = ((g @ w).float() * post).to(dx.dtype)
            if dw is not None:
                dw.add_((g.t() @ x_chunk).float(), alpha=post)
            if db is not None:
                db.add_(logits.sum(0), alpha=post)
            del logits, g
    return total, dx, dw, db


def _mean_scale(labels: torch.Tensor, ignore_index: int, reduction: str) -> float:
    n_valid = int((labels != ignore_index).sum())
    return 1.0 / n_valid if (reduction == "mean" and n_valid) else 1.0


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, ignore_index, reduction, chunk_size, backend,
                softcap=None, logit_scale=1.0):
        dtype = _compute_dtype(weight)  # the backward runs outside autocast: keep it
        ce_grad = _ce_grad_fn(backend, softcap, logit_scale)
        scale = _mean_scale(labels, ignore_index, reduction)
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                 bias is not None and ctx.needs_input_grad[3])
        ctx.recompute = dtype == torch.float16  # the loss scale must reach the gradient
        if ctx.recompute:
            total = _chunked_grads(hidden, weight, bias, labels, (False,) * 3, ce_grad, dtype,
                                   chunk_size, ignore_index, 1.0)[0]
            ctx.save_for_backward(hidden, weight, labels, bias)
            ctx.args = (needs, ce_grad, dtype, chunk_size, ignore_index, scale)
        else:  # fp32, bf16: the gradient now, of the loss times 1/n of a mean
            total, dx, dw, db = _chunked_grads(hidden, weight, bias, labels, needs, ce_grad,
                                               dtype, chunk_size, ignore_index, scale)
            ctx.save_for_backward(dx, dw, db)
            ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.recompute:
            hidden, weight, labels, bias = ctx.saved_tensors
            needs, ce_grad, dtype, chunk_size, ignore_index, scale = ctx.args
            # One host sync a backward: the factor is a launch argument of the gradient kernel.
            factor = float(grad_out) * scale
            _, dx, dw, db = _chunked_grads(hidden, weight, bias, labels, needs, ce_grad, dtype,
                                           chunk_size, ignore_index, factor)
            w_dtype, b_dtype = weight.dtype, None if bias is None else bias.dtype
        else:
            dx, dw, db = (None if t is None else t * grad_out for t in ctx.saved_tensors)
            w_dtype, b_dtype = ctx.dtypes
        dw = None if dw is None else dw.to(w_dtype)
        db = None if db is None else db.to(b_dtype)
        return dx, dw, None, db, None, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    chunk_size: int | None = None,
    backend: str = "triton",
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> torch.Tensor:
    """Cross-entropy of `hidden [N, H] @ weight[V, H].T (+ bias)` against `labels [N]`.

    reduction "mean" divides by the non-ignored tokens of this call; "sum" lets the caller
    divide by the tokens of a whole optimizer step. backend "triton" or "reference".
    `logit_scale` multiplies the fp32 logits, then `softcap` (None or 0: off) caps them at
    +-softcap with softcap * tanh(z / softcap): see the module's docstring.
    """
    _check_arguments(hidden, weight, labels, reduction, ignore_index, softcap, logit_scale)
    labels = labels.to(device=hidden.device, dtype=torch.long)
    tensors = (hidden, weight) if bias is None else (hidden, weight, bias)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        # Evaluation: the loss alone, no gradient buffers, no autograd graph.
        with torch.no_grad():
            total = _chunked_grads(hidden, weight, bias, labels, (False,) * 3,
                                   _ce_grad_fn(backend, softcap, logit_scale),
                                   _compute_dtype(weight), chunk_size, ignore_index, 1.0)[0]
        return total * _mean_scale(labels, ignore_index, reduction)
    return FusedLinearCrossEntropyFunction.apply(
        hidden, weight, labels, bias, ignore_index, reduction, chunk_size, backend,
        softcap, logit_scale,
    )


def _check_arguments(hidden, weight, labels, reduction, ignore_index, softcap, logit_scale):
    """Refuse what the kernel would get wrong silently, before anything runs on the device."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"need hidden [N, H] and labels [N], got {tuple(hidden.shape)} "
                         f"and {tuple(labels.shape)}; flatten batch and sequence first.")
    if not logit_scale > 0 or (softcap is not None and softcap < 0):
        raise ValueError(f"logit_scale must be > 0 and softcap >= 0 (or None), got "
                         f"logit_scale={logit_scale!r}, softcap={softcap!r}.")
    # The kernel reads the logit at each label's index with no bounds check: a label at or
    # past the vocabulary (a token added to the tokenizer but not to lm_head) would read
    # another row's memory. One host sync a call, on the labels alone.
    vocab = weight.shape[0]
    used = labels[labels != ignore_index]
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= vocab):
        bad = int(used.max()) if int(used.max()) >= vocab else int(used.min())
        raise ValueError(
            f"label {bad} is outside lm_head's vocabulary of {vocab} rows (ignore_index is "
            f"{ignore_index}): the tokenizer has tokens the model lacks; call "
            "model.resize_token_embeddings(len(tokenizer)) before training.")
