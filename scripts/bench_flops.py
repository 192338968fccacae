"""Matmul FLOPs of a training step, counted alike for Baton and HF + PEFT + bitsandbytes.

`torch.utils.flop_counter.FlopCounterMode` counts the aten matmuls (mm, addmm, bmm, baddbmm)
and the CUDA attention kernels by formula. Three things it does not see would skew a
comparison, so `count_flops` registers their formulas through its `custom_mapping`:

- bitsandbytes' 4-bit forward (`torch.ops.bitsandbytes.gemm_4bit`, the op `Linear4bit`
  runs, on the CPU too): a custom op, counted 0 by default, so HF's NF4 forwards would look
  free while Baton's (dequantize, then a plain matmul) are counted;
- `aten.addmm_`, the in-place addmm Baton's fused LoRA uses to add the adapter's term;
- SDPA's CPU kernels (`_scaled_dot_product_flash_attention_for_cpu` and its backward), with
  the formulas torch uses for the CUDA ones.

Dequantization, elementwise kernels and Triton programs (under the interpreter too) are not
matmuls and are not counted. Used by scripts/bench.py (`matmul_flops_per_token`) and by
tests/test_flops.py, which holds the fused MLP's count to HF's.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch.utils import flop_counter

aten = torch.ops.aten


def _gemm_4bit_flops(a_shape, b_shape, shape_b, *args, out_shape=None, **kwargs) -> int:
    """A [..., K] times the dequantized [N, K] weight (`shape_b`), transposed: 2 * M * N * K."""
    rows = math.prod(a_shape[:-1])
    n, k = shape_b
    return 2 * rows * n * k


def _addmm_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.mm_flop(a_shape, b_shape)


def _sdpa_cpu_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(q_shape, k_shape, v_shape)


def _sdpa_cpu_backward_flops(grad_shape, q_shape, k_shape, v_shape, *args, out_shape=None,
                             **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_shape, q_shape, k_shape, v_shape)


def flop_mapping() -> dict:
    """The formulas FlopCounterMode lacks, as its `custom_mapping` (keys: op packets)."""
    mapping = {
        aten.addmm_: _addmm_flops,
        aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops,
    }
    try:
        import bitsandbytes  # noqa: F401  registers torch.ops.bitsandbytes
    except ImportError:  # no bitsandbytes: no 4-bit op to count
        return mapping
    mapping[torch.ops.bitsandbytes.gemm_4bit] = _gemm_4bit_flops
    return mapping


class FlopCount:
    """What `count_flops` measured: the total, and the total by op name."""

    def __init__(self) -> None:
        self.total = 0
        self.by_op: dict[str, int] = {}

    def _take(self, mode: flop_counter.FlopCounterMode) -> None:
        self.total = mode.get_total_flops()
        self.by_op = {str(op): n for op, n in mode.get_flop_counts().get("Global", {}).items()}


@contextmanager
def count_flops() -> Iterator[FlopCount]:
    """Count the matmul FLOPs run inside the block (forward, backward and any recompute)."""
    result = FlopCount()
    mode = flop_counter.FlopCounterMode(display=False, custom_mapping=flop_mapping())
    with mode:
        yield result
    result._take(mode)
