"""Deterministic data order: which samples an optimizer step consumes.

The order of epoch e is a permutation drawn from a torch.Generator seeded from (seed, e), so the
samples of any step follow from the cursor's (epoch, epoch_position) alone: resuming is O(1) in
the number of steps done, never a replay of a loader. The eval split is drawn from the seed too.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional, Union

import torch

# Mixes the epoch into the seed so that (seed, e) and (seed + 1, e - 1) give different orders.
EPOCH_MIX = 1_000_003
# Mixes a constant into the seed for the eval subset, so it is not the epoch-0 order's head.
EVAL_MIX = 7_919


@lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, n: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed * EPOCH_MIX + epoch)
    return tuple(torch.randperm(n, generator=generator).tolist())


def step_indices(seed: int, n: int, epoch: int, position: int, count: int) -> list[tuple[int, int, int]]:
    """The next `count` samples from (epoch, position): [(sample index, epoch, position after)]."""
    out = []
    for _ in range(count):
        if position >= n:
            epoch, position = epoch + 1, 0
        out.append((epoch_permutation(seed, epoch, n)[position], epoch, position + 1))
        position += 1
    return out


def split_eval(n: int, fraction: Union[float, None], seed: int) -> tuple[list[int], list[int]]:
    """(train indices, eval indices) of n records; eval is a seeded random fraction."""
    if not fraction or n < 2:
        return list(range(n)), []
    n_eval = min(n - 1, max(1, math.ceil(fraction * n)))
    generator = torch.Generator().manual_seed(seed)
    held = set(torch.randperm(n, generator=generator)[:n_eval].tolist())
    return [i for i in range(n) if i not in held], sorted(held)


def eval_subset(n: int, cap: Optional[int], seed: int) -> list[int]:
    """Which of n held-out records the run evaluates on: all, or `cap` of them drawn from the
    seed, in file order. The same for every session, so every eval loss measures the same
    records and the losses stay comparable."""
    if not cap or n <= cap:
        return list(range(n))
    generator = torch.Generator().manual_seed(seed * EPOCH_MIX + EVAL_MIX)
    return sorted(torch.randperm(n, generator=generator)[:cap].tolist())


def total_steps(max_steps: Optional[int], epochs: Optional[float], batch_size: int,
                n_train: int) -> int:
    """Optimizer steps of a run: max_steps, else ceil(epochs * n_train / batch_size), one
    epoch when neither is set. The engine and `plan` both count with this."""
    if max_steps:
        return max_steps
    return max(1, math.ceil((epochs or 1) * n_train / batch_size))


def shard(indices: list, rank: int, world: int) -> list:
    """This rank's share of a step's samples: every world-th one, so order is kept globally."""
    return indices[rank::world]
