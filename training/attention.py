"""Per-sample attention for padding-free and packed micro-batches, wired into transformers.

transformers' own answer to restarting position_ids is a dense block-diagonal mask over the
row (masking_utils' find_packed_sequence_indices): (sum of lengths)^2 of memory and work. This
module registers Baton's varlen attention (`kernels.varlen_attention`) with transformers'
AttentionInterface and AttentionMaskInterface, by object, one name per path, and switches a
model to it with `set_attn_implementation`:

- the mask function returns no mask when the attention is a plain training forward (no KV
  cache, no padding mask): the attention function then reads the samples from position_ids;
- anything else (generation with a cache, a 2D padding mask) gets transformers' own SDPA mask
  and SDPA attention, unchanged, so eval.py's generate() behaves as before.

Which varlen path a device gets is `kernels.varlen_attention.varlen_path_for`'s rule; the name
recorded in the session record is `attention_name()`'s.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from baton.kernels.varlen_attention import (
    VARLEN_FUNCTIONS, VARLEN_PATHS, flash_available, segments_of, torch_varlen_available,
    varlen_path_for,
)

log = logging.getLogger(__name__)

IMPLEMENTATION_PREFIX = "baton_"  # the names registered with transformers: baton_sdpa_spans, ...


class AttentionLayoutError(RuntimeError):
    """The model cannot run padding-free micro-batches as built (say what to switch off)."""


def _sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _plain_training_forward(attention_mask, q_length: int, kv_length: int, q_offset) -> bool:
    offset = int(q_offset) if torch.is_tensor(q_offset) else q_offset
    return attention_mask is None and q_length == kv_length and not offset


def varlen_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                attention_mask: Optional[torch.Tensor] = None, **kwargs):
    """AttentionMaskInterface function: None (samples come from position_ids) for a training
    forward; transformers' SDPA mask for a cached or padded one."""
    if _plain_training_forward(attention_mask, q_length, kv_length, q_offset):
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                     q_offset=q_offset, kv_offset=kv_offset, attention_mask=attention_mask,
                     **kwargs)


def row_segments(module, position_ids, batch: int):
    """The samples of a padding-free row, from the positions the model passes its attention
    (each sample restarts at 0); a model that passes none cannot train padding-free."""
    if position_ids is None:
        raise AttentionLayoutError(
            f"{type(module).__name__} does not pass position_ids to its attention, so the "
            "samples of a padding-free row cannot be told apart; set data.padding_free: "
            "false (or --no-padding-free) and data.packing: false for this model")
    return segments_of(position_ids, batch)


def _make_attention(path: str):
    varlen = VARLEN_FUNCTIONS[path]

    def attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                  scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                  **kwargs):
        if attention_mask is not None or query.shape[2] != key.shape[2]:
            return _sdpa()(module, query, key, value, attention_mask, dropout=dropout,
                           scaling=scaling, sliding_window=sliding_window, **kwargs)
        segments = row_segments(module, kwargs.get("position_ids"), query.shape[0])
        out = varlen(query, key, value, segments, scale=scaling, dropout=dropout,
                     window=sliding_window)
        return out, None

    attention.baton_path = path
    return attention


def implementation_name(path: str) -> str:
    return IMPLEMENTATION_PREFIX + path


def register() -> None:
    """Register every varlen path with transformers (idempotent: the same objects again)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for path in VARLEN_PATHS:
        name = implementation_name(path)
        current = AttentionInterface._global_mapping.get(name)
        if getattr(current, "baton_path", None) != path:
            AttentionInterface.register(name, _make_attention(path))
        AttentionMaskInterface.register(name, varlen_mask)


def choose_path(device: torch.device, dtype: torch.dtype) -> str:
    """The varlen path this device runs (FlashAttention only where it can)."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return varlen_path_for(device.type, capability, flash_available(), dtype,
                           torch_varlen_available())


def use_varlen_attention(model, device: torch.device, dtype: torch.dtype) -> str:
    """Switch `model` (HF or PEFT-wrapped) to varlen attention; returns the path's name."""
    path = choose_path(torch.device(device), dtype)
    register()
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    lm.set_attn_implementation(implementation_name(path))
    running = current_attention(model)
    if running != path:  # transformers declined (a model without the AttentionInterface)
        log.warning("%s kept %s attention: rows of several samples get transformers' dense "
                    "block-diagonal mask; --no-padding-free avoids it", type(lm).__name__,
                    running)
    else:
        log.info("attention: %s (per sample, no mask over the row)", path)
    return running


def current_attention(model) -> str:
    """The attention the model runs now, by its recorded name: a varlen path, or
    transformers' own implementation (e.g. "sdpa") for padded micro-batches."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = lm.config._attn_implementation or "eager"
    return name[len(IMPLEMENTATION_PREFIX):] if name.startswith(IMPLEMENTATION_PREFIX) else name

