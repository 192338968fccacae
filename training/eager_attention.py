"""Padding-free attention for models whose attention SDPA cannot express (Gemma 2, GPT-OSS).

transformers refuses SDPA for a model whose `_supports_sdpa` is False (softcapping, sinks),
and so it refuses Baton's SDPA-per-sample path too (its registered name holds "sdpa", which
transformers checks). This module registers `kernels.varlen_eager`'s per-sample path, which
calls the family's own eager attention on each sample's span, under a name of its own with
transformers' AttentionInterface and AttentionMaskInterface, as training/attention.py does
for the SDPA and FlashAttention paths:

- a plain training forward (no cache, no padding mask) gets no mask from the mask function,
  and the attention function reads the samples from position_ids;
- anything else (generation, a padded batch) gets transformers' eager mask and the family's
  eager attention, unchanged.

`use_per_sample_attention` is the one choice for a padding-free session: this path where the
model needs it (`needs_eager`), training/attention.py's otherwise. The path's name
("eager_spans") is what the start line, the session record and `status` show.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from baton.kernels.varlen_eager import EAGER_SPANS, eager_spans, family_eager

from .attention import (current_attention, implementation_name, row_segments,
                        use_varlen_attention)

log = logging.getLogger(__name__)


def needs_eager(lm) -> bool:
    """True for a model whose attention has a rule only its eager function applies: it refuses
    SDPA (Gemma 2, GPT-OSS), or its config asks for attention-logit softcapping."""
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    softcap = getattr(config, "attn_logit_softcapping", None)
    return not getattr(lm, "_supports_sdpa", True) or softcap is not None


def _training_forward(attention_mask, q_length: int, kv_length: int, q_offset) -> bool:
    offset = int(q_offset) if torch.is_tensor(q_offset) else q_offset
    return attention_mask is None and q_length == kv_length and not offset


def eager_spans_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                     attention_mask: Optional[torch.Tensor] = None, **kwargs):
    """AttentionMaskInterface function: None for a training forward (the spans come from
    position_ids); transformers' eager mask for a cached or padded one."""
    if _training_forward(attention_mask, q_length, kv_length, q_offset):
        return None
    from transformers.masking_utils import eager_mask

    return eager_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                      q_offset=q_offset, kv_offset=kv_offset, attention_mask=attention_mask,
                      **kwargs)


def eager_spans_attention(module, query, key, value, attention_mask, sliding_window=None,
                          **kwargs):
    """AttentionInterface function: the family's eager attention, per sample when the row is
    padding-free, over the given mask otherwise."""
    eager = family_eager(module)
    position_ids = kwargs.pop("position_ids", None)
    if attention_mask is not None or query.shape[2] != key.shape[2]:
        return eager(module, query, key, value, attention_mask, **kwargs)
    segments = row_segments(module, position_ids, query.shape[0])
    out = eager_spans(module, query, key, value, segments, window=sliding_window, eager=eager,
                      **kwargs)
    return out, None


eager_spans_attention.baton_path = EAGER_SPANS


def register() -> None:
    """Register the eager per-sample path with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    name = implementation_name(EAGER_SPANS)
    AttentionInterface.register(name, eager_spans_attention)
    AttentionMaskInterface.register(name, eager_spans_mask)


def use_per_sample_attention(model, device: torch.device, dtype: torch.dtype) -> str:
    """Switch `model` to per-sample attention for padding-free rows; returns the path's name:
    "eager_spans" for a model that needs its eager attention, else training/attention.py's."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not needs_eager(lm):
        return use_varlen_attention(model, device, dtype)
    register()
    lm.set_attn_implementation(implementation_name(EAGER_SPANS))
    running = current_attention(model)
    log.info("attention: %s (the family's eager attention per sample: softcap and sinks "
             "kept)", running)
    return running
