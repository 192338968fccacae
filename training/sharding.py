"""Sharded sessions: the NF4 base split across the ranks with FSDP2, one decoder layer at a time.

In a DDP session (training/dist.py) every rank holds the whole 4-bit base, so a model must fit
one GPU. In a sharded one (`train.sharding: fsdp`) the base's bitsandbytes layers become
NF4Linear modules (training/nf4_params.py) whose packed bytes and scales are parameters, and
`torch.distributed.fsdp.fully_shard` shards them: each decoder layer is a group of its own, the
untied input embedding too; the rest (final norm, lm_head) goes with the root, since Baton's
fused loss (kernels/patch.py) reads lm_head's weight outside lm_head's own forward, where a
group of its own would still be sharded. Between layers
a rank holds 1/world of every layer; a layer's forward (and its recompute under activation
checkpointing) gathers that layer's 4-bit bytes, dequantizes them after the gather, and frees
them again (`reshard_after_forward`).

The LoRA weights and their optimizer state are NOT sharded (FSDP2's `ignored_params`): every
rank keeps all of them and their gradients are summed by one all-reduce a step, as DDP does.
The figures (docs/DESIGN.md, "Sharded sessions"): LoRA r 16 on every linear of a 32B model is
134M weights, 1.25 GiB a rank with 8-bit AdamW (4 weight + 4 grad + 2 moments), of which
sharding would save 0.62 GiB on a 16 GB T4; replicated, the adapter and the optimizer file are
the very tensors a single-GPU session saves and loads, bitsandbytes' 8-bit AdamW (plain tensors
only) keeps working, and saving needs no collective of the followers.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch
import torch.distributed as td
from torch import nn

from . import dist
from .nf4_params import replace_bnb_layers

log = logging.getLogger(__name__)

MODES = ("auto", "ddp", "fsdp")


class ShardingError(ValueError):
    """A sharded session cannot train this run as configured: the message says what to set."""


def wrap(model: nn.Module, device: torch.device, sharding: str = "ddp",
         classifier: bool = False):
    """The engine's data-parallel wrapper: None on one rank, DDP, or a ShardedModel (fsdp).
    `auto` arrives here already decided by the session (session/sharding_plan.py)."""
    if sharding not in ("ddp", "fsdp"):
        raise ShardingError(f"train.sharding {sharding!r} must be decided before the trainer "
                            "is built: ddp or fsdp")
    if sharding == "ddp" or dist.rank_and_world()[1] == 1:
        return dist.wrap(model, device)  # one rank: nothing to shard, the plain NF4 base
    if classifier:
        raise ShardingError("train.sharding fsdp trains causal LMs; a classification run "
                            "takes train.sharding: ddp")
    return ShardedModel(model, device)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers, each one FSDP group: transformers' checkpointed layer class."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ShardingError(f"{type(model).__name__} has no decoder layers transformers "
                            "checkpoints; set train.sharding: ddp for this model")
    return layers


def _groups(model: nn.Module) -> list[nn.Module]:
    """Every module sharded as a group of its own, innermost first (fully_shard's order)."""
    groups = decoder_layers(model)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and head.weight is not embed.weight:  # tied: one tensor, the root's
        groups.append(embed)
    return groups


class ShardedModel:
    """What the engine's `ddp` slot holds in a sharded session.

    Called like DDP (the training forward); `no_sync()` for every micro-batch but the step's
    last and `synced()` around the last, after which the LoRA gradients are summed over the
    ranks. `sums_gradients`: the engine does not scale the loss by the world size for DDP's
    mean. Every forward gathers layers collectively, so `fillers` tells each rank how many
    zero-weight micro-batches to add so that all run the same number."""

    sums_gradients = True

    def __init__(self, model: nn.Module, device: torch.device):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if replace_bnb_layers(model) == 0:
            raise ShardingError("train.sharding fsdp shards the 4-bit base, and this model has "
                                "no NF4 layer (model.load_in_4bit off, or no bitsandbytes): "
                                "set train.sharding: ddp")
        self.model = model
        self.lora = [p for p in model.parameters() if p.requires_grad]
        world = dist.rank_and_world()[1]
        mesh = init_device_mesh(device.type, (world,))
        ignored = set(self.lora)  # replicated: see the module's docstring
        for group in _groups(model):
            fully_shard(group, mesh=mesh, ignored_params=ignored)
        fully_shard(model, mesh=mesh, ignored_params=ignored)
        for param in self.lora:  # one adapter start on every rank, as DDP's init broadcast
            td.broadcast(param.data, src=0)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        yield  # the LoRA gradients accumulate here; the base has none to reduce

    @contextlib.contextmanager
    def synced(self):
        yield
        self.sum_gradients()

    def sum_gradients(self) -> None:
        """One all-reduce of every LoRA gradient, flattened into one buffer."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.lora]
        flat = torch.cat([g.reshape(-1) for g in grads])
        td.all_reduce(flat, op=td.ReduceOp.SUM)
        offset = 0
        for param in self.lora:
            n = param.numel()
            param.grad = flat[offset: offset + n].view_as(param).clone()
            offset += n

    def fillers(self, micro_batches: int) -> int:
        """How many zero-weight micro-batches this rank adds so every rank runs as many
        forwards as the busiest one (their gathers are collective)."""
        most = torch.tensor([micro_batches], dtype=torch.int64,
                            device=next(iter(self.lora)).device)
        td.all_reduce(most, op=td.ReduceOp.MAX)
        return int(most.item()) - micro_batches


def fillers(wrapper, micro_batches: int, training: bool = True) -> int:
    """Zero-weight micro-batches a rank adds this step (training) or eval: DDP needs one when
    a rank has no sample to train (its all-reduce must be joined); sharded, enough to match
    the busiest rank's forwards; none on one rank."""
    if isinstance(wrapper, ShardedModel):
        return wrapper.fillers(micro_batches)
    return int(wrapper is not None and training and micro_batches == 0)


def describe(wrapper) -> Optional[str]:
    return "FSDP2, NF4 base sharded" if isinstance(wrapper, ShardedModel) else None
