"""How a micro-batch's samples are laid out: padding-free (end to end) or padded rows.

Padding-free, the default for causal-LM runs: the micro-batch's samples (or packed blocks)
lie end to end in one row, position_ids restart at 0 at each sample, and every sample's first
token carries no label (the token before it ends another sample). No pad token then passes
through a linear layer, a norm or the loss, and attention stays per sample through
`training.attention` (no mask over the row). Padded: right-padded to the longest sample with an
attention_mask (`encode.collate`), as before; a packed block keeps its own position_ids.

The layout changes the computation, never the run: the same samples give the same summed token
losses either way (to float rounding), so sessions may switch layouts between them.
`uses_padding_free` is the one decision; a task that pools one row a sample (classification)
answers False there and keeps padded rows.
"""

from __future__ import annotations

from typing import Callable

import torch

from .encode import IGNORE, Encoded, collate

PADDING_FREE = "padding-free"
PADDED = "padded"


def uses_padding_free(padding_free: bool, task: str = "causal_lm") -> bool:
    """The layout of a session: padding-free only for a causal LM, and only when asked."""
    return bool(padding_free) and task == "causal_lm"


def needs_varlen_attention(padding_free: bool, packing: bool) -> bool:
    """Rows holding several samples (padding-free, or packed blocks) need per-sample
    attention; plain padded rows run the model's own attention."""
    return padding_free or packing


def collate_padding_free(samples: list[Encoded]) -> dict[str, torch.Tensor]:
    """One row: the samples end to end, positions restarting at each (a packed block brings
    its own), each sample's first token unlabelled. No attention_mask: nothing is padding."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for s in samples:
        n = len(s.input_ids)
        ids += s.input_ids
        own = s.labels if s.position_ids is not None else [IGNORE] + s.labels[1:]
        labels += own  # a packed block's samples already start unlabelled
        positions += s.position_ids if s.position_ids is not None else range(n)
    as_row = lambda values: torch.tensor([values], dtype=torch.long)  # noqa: E731
    return {"input_ids": as_row(ids), "labels": as_row(labels), "position_ids": as_row(positions)}


def collator(padding_free: bool, pad_id: int) -> Callable[[list[Encoded]], dict]:
    """The collate function of a layout."""
    if padding_free:
        return collate_padding_free
    return lambda samples: collate(samples, pad_id)


def computed_tokens(samples: list[Encoded], padding_free: bool) -> int:
    """Token positions the model computes for a micro-batch: the real ones padding-free, the
    rows times the longest sample when padded (the token-efficiency denominator)."""
    lengths = [len(s.input_ids) for s in samples]
    if not lengths:
        return 0
    return sum(lengths) if padding_free else len(lengths) * max(lengths)


def token_efficiency(lengths: list[int], micro_batch_size: int, padding_free: bool) -> float:
    """Real tokens over computed tokens when `lengths`, in order, go through micro-batches of
    `micro_batch_size` (1.0 padding-free; below 1 padded, by the padding)."""
    real = sum(lengths)
    computed = 0
    for start in range(0, len(lengths), micro_batch_size):
        chunk = lengths[start: start + micro_batch_size]
        computed += sum(chunk) if padding_free else len(chunk) * max(chunk)
    return real / computed if computed else 1.0
