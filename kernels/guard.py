"""Launch each Triton kernel on the GPU its tensors live on.

Triton launches on the *current* CUDA device, not on its arguments' device: a tensor on
cuda:1 (`bench.py --device cuda:1`, a model split across 2xT4 by `device_map="auto"`) would be
read by a kernel running on cuda:0, an illegal address at best. `@on_tensor_device` wraps a
launcher so that it runs under `torch.cuda.device(x.device)`, where `x` is its first tensor
argument (every launcher's inputs and outputs share one device); the previous device is back
when the launcher returns. CPU tensors (the interpreter) pass straight through.

`tests/test_kernels_guard.py` holds every launcher to it without a GPU: fake cuda:1 tensors
and `torch.cuda.device` replaced by a recorder.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The first tensor among a call's arguments (positional first), or None."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def on_tensor_device(launcher: F) -> F:
    """Decorator: run `launcher` with its first tensor's CUDA device current."""

    @functools.wraps(launcher)
    def guarded(*args, **kwargs):
        tensor = first_tensor(args, kwargs)
        if tensor is None or tensor.device.type != "cuda":
            return launcher(*args, **kwargs)
        with torch.cuda.device(tensor.device):
            return launcher(*args, **kwargs)

    return guarded  # type: ignore[return-value]
