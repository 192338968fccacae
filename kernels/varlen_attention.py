"""Causal attention per sample over rows that hold several samples end to end (varlen).

A padding-free micro-batch (and a packed block) is one row of samples laid end to end, each
with position_ids restarting at 0. Attention must stay inside each sample, and must cost no more
than the padded batch's: a dense block-diagonal mask over the row would cost (sum of lengths)^2
in compute and memory, so none is ever built here. Instead:

- `flash_varlen`: FlashAttention-2's varlen kernel (`flash_attn_varlen_func`), one launch over
  the whole row with the samples' cumulative lengths (cu_seqlens); CUDA sm_80+ in fp16/bf16;
- `sdpa_spans`: torch's scaled_dot_product_attention on each sample's span, causal. It runs
  everywhere (the CPU, the T4's memory-efficient kernel) and does sum(L_i^2) work against the
  padded batch's B * max(L)^2;
- `varlen_attention_reference`: the plain-PyTorch definition (a dense block-diagonal causal
  softmax) that tests hold both paths to. Tests only: it is the (sum of lengths)^2 mask.

Tensors come in Hugging Face's layout: query [B, H, L, D], key and value [B, Hkv, L, D] (GQA
when Hkv < H); the output is [B, L, H, D], what HF's attention functions return. Every row of
the batch starts a sample, and a position of 0 starts another one inside a row.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

FLASH_VARLEN = "flash_varlen"
SDPA_SPANS = "sdpa_spans"
VARLEN_PATHS = (FLASH_VARLEN, SDPA_SPANS)
FLASH_MIN_CAPABILITY = (8, 0)  # FlashAttention-2 runs on Ampere and newer; the T4 is (7, 5)


@dataclass(frozen=True)
class Segments:
    """The samples of a batch flattened row after row: [start, end) spans, and the same as
    cumulative offsets on the device (int32, what FlashAttention takes)."""

    spans: tuple[tuple[int, int], ...]
    cu_seqlens: torch.Tensor
    max_len: int
    batch: int  # rows


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
    host = bounds.tolist()  # the one sync: span lengths are needed as Python ints to split
    segments = Segments(
        spans=tuple(zip(host[:-1], host[1:])), cu_seqlens=bounds.to(torch.int32),
        max_len=max(b - a for a, b in zip(host[:-1], host[1:])), batch=batch)
    _LAST[:] = [weakref.ref(position_ids), segments]
    return segments


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] -> [1, H, B*L, D]: the rows end to end (a view when B is 1)."""
    b, h, n, d = x.shape
    return x if b == 1 else x.transpose(0, 1).reshape(h, b * n, d).unsqueeze(0)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """GQA: each key/value head serves `groups` query heads (HF's repeat_kv)."""
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def _unflat(out: torch.Tensor, batch: int) -> torch.Tensor:
    """[1, H, B*L, D] -> [B, L, H, D]."""
    _, h, total, d = out.shape
    return out.reshape(h, batch, total // batch, d).permute(1, 2, 0, 3)


def window_mask(length: int, window: int, device) -> torch.Tensor:
    """Causal and at most `window` tokens back, the token itself included (HF's sliding
    window: key j is seen from query i when i - window < j <= i). [length, length], bool."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    return (j <= i) & (j > i - window)


def sdpa_spans(query, key, value, segments: Segments, *, scale: Optional[float] = None,
               dropout: float = 0.0, window: Optional[int] = None) -> torch.Tensor:
    """Causal SDPA on each sample's span; no mask unless a sliding window is shorter than the
    sample (then that sample's own [L, L] band, still no more than its padded cost)."""
    batch = query.shape[0]
    groups = query.shape[1] // key.shape[1]
    lengths = [end - start for start, end in segments.spans]
    # split, not slicing: its backward is one concatenation, where each slice's backward
    # would write a zero-filled tensor of the whole row.
    spans = zip(*(_flat(t).split(lengths, dim=2)
                  for t in (query, _repeat_kv(key, groups), _repeat_kv(value, groups))))
    outs = []
    for q, k, v in spans:
        mask = None
        if window is not None and q.shape[2] > window:
            mask = window_mask(q.shape[2], window, query.device)
        outs.append(F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=scale))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return _unflat(out, batch)


def flash_varlen(query, key, value, segments: Segments, *, scale: Optional[float] = None,
                 dropout: float = 0.0, window: Optional[int] = None) -> torch.Tensor:
    """FlashAttention-2's varlen kernel over the whole row: one launch, GQA native."""
    from flash_attn import flash_attn_varlen_func

    batch, heads, length, dim = query.shape
    q = query.transpose(1, 2).reshape(batch * length, heads, dim)
    k = key.transpose(1, 2).reshape(batch * length, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(batch * length, value.shape[1], dim)
    cu = segments.cu_seqlens.to(query.device)
    # FlashAttention's window counts the tokens before the query: HF's window minus itself.
    left = window - 1 if window is not None and segments.max_len > window else -1
    out = flash_attn_varlen_func(
        q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=segments.max_len,
        max_seqlen_k=segments.max_len, dropout_p=dropout, softmax_scale=scale, causal=True,
        window_size=(left, -1 if left < 0 else 0))
    return out.reshape(batch, length, heads, dim)


def varlen_attention_reference(query, key, value, segments: Segments, *,
                               scale: Optional[float] = None,
                               window: Optional[int] = None) -> torch.Tensor:
    """The definition, densely: softmax(q k^T * scale) under a block-diagonal causal mask over
    the whole flattened batch. Costs (sum of lengths)^2: for tests, never for training."""
    batch = query.shape[0]
    groups = query.shape[1] // key.shape[1]
    q, k, v = _flat(query), _flat(_repeat_kv(key, groups)), _flat(_repeat_kv(value, groups))
    total = q.shape[2]
    sample = torch.zeros(total, dtype=torch.long, device=q.device)
    for n, (start, end) in enumerate(segments.spans):
        sample[start:end] = n
    i = torch.arange(total, device=q.device)
    allowed = (sample[:, None] == sample[None, :]) & (i[None, :] <= i[:, None])
    if window is not None:
        allowed &= i[None, :] > i[:, None] - window
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return _unflat((probs @ v.float()).to(query.dtype), batch)


def varlen_path_for(device_type: str, capability: Optional[tuple[int, int]], has_flash: bool,
                    dtype: torch.dtype) -> str:
    """The rule without a device: FlashAttention's varlen kernel where it is installed, the GPU
    is sm_80+ and the compute dtype is 16-bit (its only dtypes); SDPA per span elsewhere."""
    if (device_type == "cuda" and has_flash and capability is not None
            and tuple(capability) >= FLASH_MIN_CAPABILITY
            and dtype in (torch.float16, torch.bfloat16)):
        return FLASH_VARLEN
    return SDPA_SPANS


def flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


VARLEN_FUNCTIONS = {FLASH_VARLEN: flash_varlen, SDPA_SPANS: sdpa_spans}
