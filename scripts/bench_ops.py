"""What a training step asks of the device, counted: ATen ops, and bytes of lm_head read.

Both are counts, independent of the machine's load, so tests may assert them where timings
would only mislead:

- ops: every op that reaches the dispatcher below autograd (forward, checkpoint recompute,
  backward, optimizer), by name. On a CPU each one pays an OpenMP fork-join; on a GPU each is
  at least one kernel launch. `tests/test_attention_ops.py` holds Baton's count per step to
  HF's on the bench's configuration.
- lm_head reads: the bytes of every matmul operand shaped like the lm_head weight ([V, H] or
  its transpose), which is what a fused loss with small chunks reads over and over.

    with count_ops(lm_head_shape=(49152, 576)) as ops:
        train_step()
    ops.total, ops.by_op, ops.lm_head_bytes
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_MATMULS = {aten.mm, aten.addmm, aten.addmm_, aten.bmm, aten.baddbmm, aten.matmul}


class OpCount:
    """What `count_ops` measured."""

    def __init__(self) -> None:
        self.by_op: Counter = Counter()
        self.lm_head_bytes = 0
        self.lm_head_reads = 0

    @property
    def total(self) -> int:
        return sum(self.by_op.values())


class _Counter(TorchDispatchMode):
    def __init__(self, result: OpCount, lm_head_shape: Optional[tuple[int, int]]) -> None:
        super().__init__()
        self.result = result
        shape = None if lm_head_shape is None else tuple(lm_head_shape)
        self.shapes = set() if shape is None else {shape, shape[::-1]}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.result.by_op[str(func.overloadpacket.__name__)] += 1
        if self.shapes and func.overloadpacket in _MATMULS:
            for arg in args:
                if isinstance(arg, torch.Tensor) and tuple(arg.shape) in self.shapes:
                    self.result.lm_head_bytes += arg.numel() * arg.element_size()
                    self.result.lm_head_reads += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def count_ops(lm_head_shape: Optional[tuple[int, int]] = None) -> Iterator[OpCount]:
    """Count the ops run inside the block, and the lm_head-shaped matmul operands' bytes."""
    result = OpCount()
    with _Counter(result, lm_head_shape):
        yield result


def lm_head_shape(model) -> Optional[tuple[int, int]]:
    """(vocab, hidden) of the model's output layer, None where it has none."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return None if weight is None else tuple(weight.shape)
