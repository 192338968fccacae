"""Causal attention per sample over rows that hold several samples end to end (varlen).

A padding-free micro-batch (and a packed block) is one row of samples laid end to end, each
with position_ids restarting at 0. Attention must stay inside each sample, and must cost no more
than the padded batch's: a dense block-diagonal mask over the row would cost (sum of lengths)^2
in compute and memory, so none is ever built here. One attention call per layer, per device:

- `flash_varlen`: FlashAttention-2's `flash_attn_varlen_func` where flash_attn is installed,
  CUDA sm_80+, 16-bit;
- `torch_varlen`: PyTorch's own `torch.nn.attention.varlen.varlen_attn` (its FlashAttention-2
  build), CUDA sm_80+, 16-bit: an L4, A100 or H100 gets one call a layer with no flash-attn build;
- `efficient_varlen`: the T4 (sm_75, and fp32 on any GPU): the memory-efficient kernel with the
  samples' cumulative lengths (`aten._efficient_attention_forward`, the op PyTorch's own SDPA
  on nested jagged tensors calls for its memory-efficient backend; called directly, it takes
  cu_seqlens without building a nested tensor). It has no GQA: K and V are repeated once;
- `sdpa_spans`: the CPU (and a sliding window the efficient kernel cannot take): spans grouped
  into length buckets, each bucket one SDPA call on its spans right-padded to its longest, with
  `enable_gqa`. Causal attention needs no mask for right padding: a real query sees only keys at
  or before it, all of its own sample; the padded queries' outputs are dropped. A bucket's
  padded work is at most BUCKET_WASTE times its spans' own (equal lengths waste nothing), so
  the attention never costs more than 2x sum(L_i^2), nor more than the padded batch's;
- `varlen_attention_reference`: the plain-PyTorch definition (a dense block-diagonal causal
  softmax) that tests hold every path to. Tests only: it is the (sum of lengths)^2 mask.

FlashAttention takes fp16 and bf16 only, and the session's dtype is not the tensors': with fp16
forced on sm_80+ HF's RoPE returns fp32 q and k (its cos and sin are fp32). `_flash_dtype`
casts them to the 16-bit dtype of v (or autocast's), as HF's own flash integration does, and
sends fp32 throughout to a path that takes it.

Tensors come in Hugging Face's layout: query [B, H, L, D], key and value [B, Hkv, L, D] (GQA
when Hkv < H); the output is [B, L, H, D], what HF's attention functions return. Every row of
the batch starts a sample, and a position of 0 starts another one inside a row.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

FLASH_VARLEN = "flash_varlen"
TORCH_VARLEN = "torch_varlen"
EFFICIENT_VARLEN = "efficient_varlen"
SDPA_SPANS = "sdpa_spans"
VARLEN_PATHS = (FLASH_VARLEN, TORCH_VARLEN, EFFICIENT_VARLEN, SDPA_SPANS)
FLASH_MIN_CAPABILITY = (8, 0)  # FlashAttention-2 runs on Ampere and newer; the T4 is (7, 5)
SIXTEEN_BIT = (torch.float16, torch.bfloat16)
# A bucket's padded attention work over its spans' own, at most. Each bucket is a kernel call
# and a dozen ops a layer (forward, recompute, backward), each a fork-join on a CPU: the
# demo's micro-batches (8 samples of 90-300 tokens) pad to 1.8-2.1x and mostly take one call.
BUCKET_WASTE = 2.0


@dataclass(frozen=True)
class Segments:
    """The samples of a batch flattened row after row: [start, end) spans, and the same as
    cumulative offsets on the device (int32, what FlashAttention takes)."""

    spans: tuple[tuple[int, int], ...]
    cu_seqlens: torch.Tensor
    max_len: int
    batch: int  # rows
    _buckets: dict = field(default_factory=dict, compare=False, repr=False)


# The segments of the last position_ids seen: every layer of a forward (and the checkpoint's
# recompute in backward) gets the same tensor, so the one host sync happens once a forward.
_LAST: list = [None, None]


def segments_of(position_ids: torch.Tensor, batch: int) -> Segments:
    """Samples from restarting positions: a sample starts at each row and at each position 0."""
    cached, segments = _LAST
    if cached is not None and cached() is position_ids and segments.batch == batch:
        return segments
    pos = position_ids.reshape(-1, position_ids.shape[-1])
    if pos.shape[0] != batch:
        pos = pos.expand(batch, -1)  # HF's default positions are one row for the whole batch
    starts = pos == 0
    starts[:, 0] = True
    index = starts.reshape(-1).nonzero().flatten()
    total = pos.numel()
    bounds = torch.cat([index, index.new_tensor([total])])
    host = bounds.tolist()  # the one sync: span lengths are needed as Python ints
    segments = Segments(
        spans=tuple(zip(host[:-1], host[1:])), cu_seqlens=bounds.to(torch.int32),
        max_len=max(b - a for a, b in zip(host[:-1], host[1:])), batch=batch)
    _LAST[:] = [weakref.ref(position_ids), segments]
    return segments


def group_spans(lengths: list[int], waste: float = BUCKET_WASTE) -> list[list[int]]:
    """Span indices in buckets, longest first: a span joins the open bucket while the bucket's
    padded work (count x longest^2) stays within `waste` x its spans' sum of L^2."""
    buckets: list[list[int]] = []
    work = 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if buckets:
            longest = lengths[buckets[-1][0]]
            if (len(buckets[-1]) + 1) * longest**2 <= waste * (work + lengths[i] ** 2):
                buckets[-1].append(i)
                work += lengths[i] ** 2
                continue
        buckets.append([i])
        work = lengths[i] ** 2
    return buckets


@dataclass(frozen=True)
class _Bucket:
    """Spans attended in one kernel call, right-padded to the longest. Slot (i, j) of the
    [count, H, length, D] call holds the token at row `rows[i, 0, j]`, position `pos[i, 0, j]`
    of the [B, L] batch (a padded slot repeats its span's last token), and `valid[i, 0, j, 0]`
    is False on padding. The real slots alone, flat: (slot_i, slot_j) there, (tok_b, tok_l)
    in the batch."""

    rows: torch.Tensor
    pos: torch.Tensor
    valid: torch.Tensor
    slot_i: torch.Tensor
    slot_j: torch.Tensor
    tok_b: torch.Tensor
    tok_l: torch.Tensor


def plan_of(segments: Segments, row_length: int, device) -> tuple[_Bucket, ...]:
    """The length buckets of `segments` (rows of `row_length` tokens), built once a device."""
    key = str(device)
    if key not in segments._buckets:
        lengths = [end - start for start, end in segments.spans]
        buckets = []
        for members in group_spans(lengths):
            longest = lengths[members[0]]
            tokens, valid, real = [], [], []
            for i, member in enumerate(members):
                start, end = segments.spans[member]
                tokens += [min(start + j, end - 1) for j in range(longest)]
                valid += [j < end - start for j in range(longest)]
                real += [(i, t - start, t) for t in range(start, end)]
            index = torch.tensor(tokens).view(len(members), 1, longest)
            slot_i, slot_j, flat = torch.tensor(real).unbind(1)
            buckets.append(_Bucket(*(t.to(device) for t in (
                index // row_length, index % row_length,
                torch.tensor(valid).view(len(members), 1, longest, 1),
                slot_i, slot_j, flat // row_length, flat % row_length))))
        segments._buckets[key] = tuple(buckets)
    return segments._buckets[key]


_HEADS: dict = {}


def _heads(n: int, device) -> torch.Tensor:
    """arange(n) as [1, n, 1], which gathers [count, H, length] slots; made once a device."""
    key = (n, str(device))
    if key not in _HEADS:
        _HEADS[key] = torch.arange(n, device=device)[None, :, None]
    return _HEADS[key]


class _BucketedSDPA(torch.autograd.Function):
    """SDPA over the length buckets, forward and backward by hand on torch's CPU attention
    kernel, so that a layer's attention is a handful of ops: per bucket one gather of each of
    q, k and v, one kernel, one scatter of its real slots back to the batch (and the same in
    the backward). With autograd around each piece it took twice as many."""

    @staticmethod
    def forward(ctx, query, key, value, plan, scale, window):
        batch, heads, length, dim = query.shape
        heads_q, heads_kv = _heads(heads, query.device), _heads(key.shape[1], key.device)
        saved = []
        result = query.new_empty(batch, length, heads, dim)  # HF's [B, L, H, D]
        for bucket in plan:
            q = query[bucket.rows, heads_q, bucket.pos]  # [count, H, longest, D]
            k = key[bucket.rows, heads_kv, bucket.pos]
            v = value[bucket.rows, heads_kv, bucket.pos]
            mask = _band(bucket.rows.shape[-1], window, q)
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, mask is None, attn_mask=mask, scale=scale)
            result[bucket.tok_b, bucket.tok_l] = out[bucket.slot_i, :, bucket.slot_j]
            saved += [q, k, v, out, lse]
        ctx.save_for_backward(*saved)
        ctx.plan, ctx.scale, ctx.window = plan, scale, window
        ctx.shapes = (query.shape, key.shape)
        return result

    @staticmethod
    def backward(ctx, grad):
        q_shape, kv_shape = ctx.shapes
        heads = _heads(q_shape[1], grad.device)
        grads = [grad.new_zeros(shape) for shape in (q_shape, kv_shape, kv_shape)]
        saved = ctx.saved_tensors  # once: under checkpointing each unpack is a recompute's
        for n, bucket in enumerate(ctx.plan):
            q, k, v, out, lse = saved[5 * n: 5 * n + 5]
            g = grad[bucket.rows, bucket.pos, heads] * bucket.valid  # padded outputs: dropped
            mask = _band(bucket.rows.shape[-1], ctx.window, q)
            parts = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                g, q, k, v, out, lse, 0.0, mask is None, attn_mask=mask, scale=ctx.scale)
            # Real tokens appear once among the real slots, and padded slots' gradients are
            # 0 (no real query sees a padded key): taking the real slots alone is exact.
            for total, part in zip(grads, parts):
                total[bucket.tok_b, :, bucket.tok_l] = part[bucket.slot_i, :, bucket.slot_j]
        return (*grads, None, None, None)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] -> [B*L, H, D]: tokens end to end (a view for HF's transposed layout)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b * n, h, d)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """GQA for kernels without it: each key/value head serves `groups` query heads."""
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def window_mask(length: int, window: int, device) -> torch.Tensor:
    """Causal and at most `window` tokens back, the token itself included (HF's sliding
    window: key j is seen from query i when i - window < j <= i). [length, length], bool."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    return (j <= i) & (j > i - window)


def sdpa_spans(query, key, value, segments: Segments, *, scale: Optional[float] = None,
               dropout: float = 0.0, window: Optional[int] = None) -> torch.Tensor:
    """Causal SDPA on the spans, one call per length bucket (right-padded, no mask unless a
    sliding window is shorter than the longest span), GQA inside the kernel, no repeated K/V."""
    plan = plan_of(segments, query.shape[2], query.device)
    query, key, value = _common_dtype(query, key, value)
    if dropout or query.is_cuda:
        return _sdpa_autograd(query, key, value, plan, scale, dropout, window)
    return _BucketedSDPA.apply(query, key, value, plan, scale, window)


def _band(length: int, window: Optional[int], like: torch.Tensor) -> Optional[torch.Tensor]:
    """A bucket's mask: none (causal) unless the sliding window is shorter than it; additive,
    in `like`'s dtype (what torch's CPU attention kernel takes)."""
    if window is None or length <= window:
        return None
    allowed = window_mask(length, window, like.device)
    return torch.zeros(allowed.shape, dtype=like.dtype, device=like.device).masked_fill_(
        ~allowed, float("-inf"))


def _common_dtype(query, key, value):
    """One dtype for the kernel: autocast's where it is on (as SDPA is autocast), else the
    widest (HF's RoPE may leave q and k fp32 beside a 16-bit v)."""
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    elif query.dtype == key.dtype == value.dtype:
        return query, key, value
    else:
        dtype = torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in (query, key, value))


def _sdpa_autograd(query, key, value, plan, scale, dropout, window) -> torch.Tensor:
    """The buckets through F.scaled_dot_product_attention and autograd: dropout (whose mask
    the CPU kernel's backward cannot replay) and CUDA tensors (SDPA's own GPU kernels)."""
    batch, heads, length, dim = query.shape
    heads_q, heads_kv = _heads(heads, query.device), _heads(key.shape[1], key.device)
    result = query.new_zeros(batch, length, heads, dim)
    for bucket in plan:
        mask = _band(bucket.rows.shape[-1], window, query)
        out = F.scaled_dot_product_attention(
            query[bucket.rows, heads_q, bucket.pos], key[bucket.rows, heads_kv, bucket.pos],
            value[bucket.rows, heads_kv, bucket.pos], attn_mask=mask, dropout_p=dropout,
            is_causal=mask is None, scale=scale, enable_gqa=heads != key.shape[1])
        result = result.index_put((bucket.tok_b, bucket.tok_l),
                                  out[bucket.slot_i, :, bucket.slot_j])
    return result


def _flash_dtype(query, key, value) -> Optional[torch.dtype]:
    """The 16-bit dtype FlashAttention gets, None when the tensors are fp32 with nothing to
    say otherwise: v's own when 16-bit (q and k are fp32 after HF's fp32 RoPE), else
    autocast's."""
    if value.dtype in SIXTEEN_BIT:
        return value.dtype
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        if dtype in SIXTEEN_BIT:
            return dtype
    return None


def _fallback(query, key, value, segments, **kw) -> torch.Tensor:
    """Where FlashAttention cannot take the tensors (fp32): the path that can, one call."""
    path = EFFICIENT_VARLEN if query.is_cuda else SDPA_SPANS
    return VARLEN_FUNCTIONS[path](query, key, value, segments, **kw)


def _flash_inputs(query, key, value, segments: Segments, window: Optional[int]):
    """(q, k, v as [tokens, H, D] in one 16-bit dtype, cu_seqlens, the window's left size or
    -1), the arguments both FlashAttention paths take; None for fp32 tensors."""
    dtype = _flash_dtype(query, key, value)
    if dtype is None:
        return None
    q, k, v = (_tokens(t if t.dtype == dtype else t.to(dtype)) for t in (query, key, value))
    # FlashAttention's window counts the tokens before the query: HF's window minus itself.
    left = window - 1 if window is not None and segments.max_len > window else -1
    return q, k, v, segments.cu_seqlens.to(query.device), left


def flash_varlen(query, key, value, segments: Segments, *, scale: Optional[float] = None,
                 dropout: float = 0.0, window: Optional[int] = None) -> torch.Tensor:
    """FlashAttention-2's varlen kernel over the whole row: one launch, GQA native."""
    from flash_attn import flash_attn_varlen_func

    inputs = _flash_inputs(query, key, value, segments, window)
    if inputs is None:
        return _fallback(query, key, value, segments, scale=scale, dropout=dropout,
                         window=window)
    q, k, v, cu, left = inputs
    out = flash_attn_varlen_func(
        q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=segments.max_len,
        max_seqlen_k=segments.max_len, dropout_p=dropout, softmax_scale=scale, causal=True,
        window_size=(left, -1 if left < 0 else 0))
    return out.reshape(query.shape[0], query.shape[2], query.shape[1], query.shape[3])


def torch_varlen(query, key, value, segments: Segments, *, scale: Optional[float] = None,
                 dropout: float = 0.0, window: Optional[int] = None) -> torch.Tensor:
    """PyTorch's `varlen_attn` (FlashAttention-2 inside torch) over the whole row."""
    from torch.nn.attention.varlen import varlen_attn

    inputs = None if dropout else _flash_inputs(query, key, value, segments, window)
    if inputs is None:  # fp32, or dropout (varlen_attn has none)
        return _fallback(query, key, value, segments, scale=scale, dropout=dropout,
                         window=window)
    q, k, v, cu, left = inputs
    out = varlen_attn(q, k, v, cu, cu, segments.max_len, segments.max_len, scale=scale,
                      window_size=(left, 0), enable_gqa=q.shape[1] != k.shape[1])
    return out.reshape(query.shape[0], query.shape[2], query.shape[1], query.shape[3])


def efficient_varlen(query, key, value, segments: Segments, *, scale: Optional[float] = None,
                     dropout: float = 0.0, window: Optional[int] = None) -> torch.Tensor:
    """The memory-efficient kernel (sm_50+, fp32/fp16/bf16) over the whole row with the
    samples' cumulative lengths; causal from each sample's first token (mask type 1)."""
    if window is not None and segments.max_len > window:
        return sdpa_spans(query, key, value, segments, scale=scale, dropout=dropout,
                          window=window)  # SDPA's own kernels take the band mask
    batch, heads, length, dim = query.shape
    groups = heads // key.shape[1]
    q, k, v = (_tokens(t)[None] for t in (query, _repeat_kv(key, groups),
                                          _repeat_kv(value, groups)))
    cu = segments.cu_seqlens.to(query.device)
    out = torch.ops.aten._efficient_attention_forward(
        q, k, v, None, cu, cu, segments.max_len, segments.max_len, dropout, 1,
        torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)), scale=scale)[0]
    return out.reshape(batch, length, heads, dim)


def varlen_attention_reference(query, key, value, segments: Segments, *,
                               scale: Optional[float] = None,
                               window: Optional[int] = None) -> torch.Tensor:
    """The definition, densely: softmax(q k^T * scale) under a block-diagonal causal mask over
    the whole flattened batch. Costs (sum of lengths)^2: for tests, never for training."""
    batch, heads, length, dim = query.shape
    groups = heads // key.shape[1]
    q, k, v = (_tokens(t).transpose(0, 1).float()
               for t in (query, _repeat_kv(key, groups), _repeat_kv(value, groups)))
    total = q.shape[1]
    sample = torch.zeros(total, dtype=torch.long, device=q.device)
    for n, (start, end) in enumerate(segments.spans):
        sample[start:end] = n
    i = torch.arange(total, device=q.device)
    allowed = (sample[:, None] == sample[None, :]) & (i[None, :] <= i[:, None])
    if window is not None:
        allowed &= i[None, :] > i[:, None] - window
    scale = dim ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    out = (probs @ v).transpose(0, 1).to(query.dtype)  # [total, H, D]
    return out.reshape(batch, length, heads, dim)


def torch_varlen_available() -> bool:
    """True when this torch has `torch.nn.attention.varlen` (2.9 and newer)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def varlen_path_for(device_type: str, capability: Optional[tuple[int, int]], has_flash: bool,
                    dtype: torch.dtype, has_torch_varlen: bool = True) -> str:
    """The rule without a device. CUDA sm_80+ in 16-bit: flash_attn where installed, else
    torch's varlen_attn; any other CUDA GPU (the T4), or fp32: the memory-efficient kernel;
    the CPU: SDPA per length bucket."""
    if device_type != "cuda" or capability is None:
        return SDPA_SPANS
    if tuple(capability) >= FLASH_MIN_CAPABILITY and dtype in SIXTEEN_BIT:
        if has_flash:
            return FLASH_VARLEN
        if has_torch_varlen:
            return TORCH_VARLEN
    return EFFICIENT_VARLEN


def flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


VARLEN_FUNCTIONS = {FLASH_VARLEN: flash_varlen, TORCH_VARLEN: torch_varlen,
                    EFFICIENT_VARLEN: efficient_varlen, SDPA_SPANS: sdpa_spans}
