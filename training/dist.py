"""Data-parallel helpers over torch.distributed; a no-op when no process group is running.

The caller (the agent under torchrun, or a test with gloo) initialises the process group.
Gradients of the LoRA weights are summed across ranks by one all-reduce per optimizer step:
each rank's loss is already divided by the step's global token count, so a sum is the mean.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    if not active():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def sum_scalar(value: float, device: torch.device) -> float:
    """The sum over ranks of a number (as float64, exact for token counts)."""
    if not active():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item())


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """All-reduce (sum) every gradient in one flat buffer; a missing gradient counts as zero."""
    if not active():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for param, grad in zip(params, grads):
        count = grad.numel()
        param.grad = flat[offset: offset + count].view_as(param).clone()
        offset += count


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (for logs and tests)."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
