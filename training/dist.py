"""Data-parallel helpers over torch.distributed; a no-op when no process group is running.

The caller (the agent's ranks under torch's elastic launcher, or a test with gloo) initialises
the process group. Gradients are reduced by DistributedDataParallel: bucketed all-reduces that
overlap the backward pass, once per optimizer step (the other micro-batches run under
`no_sync`). Each rank's loss is its summed token loss divided by the step's GLOBAL label-token
count, so the gradient the step needs is the SUM over ranks; DDP averages, so the engine
multiplies the loss by `loss_factor()` (the world size) before backward.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def process_group_backend(world: int, gpus: int) -> str:
    """NCCL when each rank has a GPU of its own; gloo when ranks share one (NCCL refuses two
    ranks on one device: the GPU check runs 2 ranks on 1 GPU), and on the CPU."""
    return "nccl" if 0 < world <= gpus else "gloo"


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


def wrap(model: torch.nn.Module, device: torch.device) -> Optional[DistributedDataParallel]:
    """`model` under DDP when more than one rank runs, else None (train the model itself).

    Only the trainable (LoRA) weights are DDP's business: the frozen base, 4-bit or not, is
    loaded from the same files on every rank, so broadcasting gigabytes of it at start (DDP's
    init sync) would only cost time; buffers are identical for the same reason. The LoRA
    weights are still broadcast from rank 0 once, so every rank starts from the same adapter."""
    if not active() or dist.get_world_size() == 1:
        return None
    skip = [name for name, param in model.named_parameters() if not param.requires_grad]
    skip += [name for name, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, skip)
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def loss_factor() -> int:
    """What a rank's loss is multiplied by before backward so that DDP's mean is our sum."""
    return rank_and_world()[1]


def sync_unless(ddp: Optional[DistributedDataParallel], last: bool):
    """DDP's `no_sync` for every micro-batch of a step but the last: one all-reduce a step.
    A wrapper with `synced()` (sharding.ShardedModel) reduces on leaving the last one."""
    if ddp is None:
        return contextlib.nullcontext()
    if last:
        return getattr(ddp, "synced", contextlib.nullcontext)()
    return ddp.no_sync()


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (for logs and tests)."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def from_leader(obj):
    """Rank 0's `obj` on every rank (the object itself where no process group runs)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
