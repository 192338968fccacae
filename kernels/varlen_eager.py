"""Per-sample attention through the model's own eager attention function (varlen, eager).

Some attention rules have no SDPA or FlashAttention form: Gemma 2's attention-logit
softcapping (tanh over the scores before the softmax), GPT-OSS's sinks (a learned logit per
head that joins each softmax and is dropped after it). transformers keeps them in each family's
`eager_attention_forward`, and refuses SDPA for those models. For a padding-free row this path
calls that very function once per sample span, with a causal mask of the span only (banded by
the layer's sliding window when it has one), so every rule the family's eager attention
applies (softcap, sinks, scaling, dropout, GQA) is kept and no row-wide mask is built: the
work and memory are the padded batch's at most (sum of L_i^2 against B * max(L)^2).

Tensors come in Hugging Face's layout: query [B, H, L, D], key and value [B, Hkv, L, D]; the
output is [B, L, H, D]. A sample starts at each row and at each position 0 (`Segments`).
"""

from __future__ import annotations

import sys
from typing import Callable, Optional

import torch

from baton.kernels.varlen_attention import Segments, window_mask

EAGER_SPANS = "eager_spans"


def span_mask(length: int, window: Optional[int], dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    """The additive [1, 1, L, L] mask HF's eager attention adds to its scores: 0 where key j
    is seen from query i (causal, and within `window` when given), the dtype's min elsewhere."""
    allowed = window_mask(length, window if window is not None else length, device)
    mask = torch.zeros((length, length), dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] -> [1, H, B*L, D]: the rows end to end (a view when B is 1)."""
    b, h, n, d = x.shape
    return x if b == 1 else x.transpose(0, 1).reshape(h, b * n, d).unsqueeze(0)


def family_eager(module: torch.nn.Module) -> Callable:
    """The `eager_attention_forward` of the modeling module that defines `module`'s class
    (Gemma 2's with softcap, GPT-OSS's with sinks), or of its nearest base class's."""
    for cls in type(module).__mro__:
        fn = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if callable(fn):
            return fn
    raise ValueError(f"{type(module).__name__} has no eager_attention_forward in its modeling "
                     "module; set data.padding_free: false (--no-padding-free) for this model")


def eager_spans(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, segments: Segments, *, window: Optional[int] = None,
                eager: Optional[Callable] = None, **kwargs) -> torch.Tensor:
    """The family's eager attention on each sample's span; `kwargs` (scaling, dropout,
    softcap, s_aux, ...) go to it unchanged. Returns [B, L, H, D]."""
    eager = eager or family_eager(module)
    batch, heads, length, dim = query.shape
    lengths = [end - start for start, end in segments.spans]
    outs = []
    for q, k, v in zip(*(_flat(t).split(lengths, dim=2) for t in (query, key, value))):
        mask = span_mask(q.shape[2], window, q.dtype, q.device)
        out, _ = eager(module, q, k, v, mask, **kwargs)
        outs.append(out)  # [1, L_i, H, D]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return out.reshape(batch, length, heads, dim)


def eager_spans_reference(module, query, key, value, segments: Segments, *,
                          window: Optional[int] = None, eager: Optional[Callable] = None,
                          **kwargs) -> torch.Tensor:
    """The definition, densely, for tests: the family's eager attention over each row with a
    block-diagonal causal (windowed) mask over that row. Costs (row length)^2."""
    eager = eager or family_eager(module)
    batch, _, length, _ = query.shape
    sample = torch.zeros(batch * length, dtype=torch.long, device=query.device)
    for n, (start, end) in enumerate(segments.spans):
        sample[start:end] = n
    sample = sample.view(batch, length)
    i = torch.arange(length, device=query.device)
    allowed = (sample[:, :, None] == sample[:, None, :]) & (i[None, None, :] <= i[None, :, None])
    if window is not None:
        allowed &= i[None, None, :] > i[None, :, None] - window
    mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
    mask = mask.masked_fill(~allowed, torch.finfo(query.dtype).min)[:, None]
    return eager(module, query, key, value, mask, **kwargs)[0]
