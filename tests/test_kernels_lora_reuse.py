"""The fused LoRA MLP reuses its forward's gate and up outputs in the backward.

Under non-reentrant gradient checkpointing (how Baton trains) the tensors the backward uses
are the recompute's, and the backward overwrites them with their gradients: the result must
still be the reference's, and a second backward through the same graph must be refused, not
silently wrong.
"""

from __future__ import annotations

import os

# Must precede the first import of a Triton kernel module (see test_kernels_nf4.py).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from baton.kernels.lora import lora_mlp, lora_mlp_reference  # noqa: E402
from tests.test_kernels_lora import _compare, _projection, _twin, _x  # noqa: E402


def _mlp_projections(dtype):
    return [_projection(21, 64, 128, dtype), _projection(22, 64, 128, dtype),
            _projection(23, 128, 64, dtype)]


def test_checkpointed_fused_mlp_matches_the_reference():
    # fp32: the reuse is the same code in every dtype (test_kernels_lora.py covers the dtypes).
    dtype = torch.float32
    projs = _mlp_projections(dtype)
    refs = [_twin(p) for p in projs]
    x, x_ref = _x((2, 9, 64), dtype), _x((2, 9, 64), dtype)
    out = checkpoint(lora_mlp, x, *projs, use_reentrant=False)
    ref = checkpoint(lora_mlp_reference, x_ref, *refs, use_reentrant=False)
    _compare([out], [ref], x, x_ref, projs, refs, dtype)


def test_a_second_backward_through_the_fused_mlp_is_refused():
    projs = _mlp_projections(torch.float32)
    x = _x((5, 64), torch.float32)
    y = lora_mlp(x, *projs)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once per forward"):
        y.sum().backward()
