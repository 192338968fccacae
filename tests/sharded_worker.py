"""Two gloo ranks for the sharded-session tests: several tasks in one process group.

    python tests/sharded_worker.py JOB.json

JOB: {"world": 2, "out": folder, "tasks": [...]}; each task is
- {"kind": "gather", "name": ...}: NF4 layers with crafted bytes (NaN patterns in fp16 and
  bf16 when two bytes are read as one 16-bit value), sharded with FSDP2 and gathered back;
- {"kind": "train", "name": ..., plus tests/ddp_worker.py's job keys}: a Trainer with
  `sharding` (ddp|fsdp), its per-step losses, LoRA gradients (before the optimizer step) and
  the parameter bytes resident on the rank at each decoder layer's forward.
Each rank writes out/<name>.<rank>.pt; a world of 1 runs the tasks in this process.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Little-endian byte pairs that read as NaN: fp16 0x7FFF / 0x7C01 / 0xFE00, bf16 0x7F81 /
# 0xFFC1 (0x7FFF is NaN in both). FSDP must copy them, never pass them through a float cast.
NAN_PAIRS = [(0xFF, 0x7F), (0x01, 0x7C), (0x00, 0xFE), (0x81, 0x7F), (0xC1, 0xFF)]


def nan_bytes(n: int) -> "torch.Tensor":
    import torch

    pattern = torch.tensor([b for pair in NAN_PAIRS for b in pair], dtype=torch.uint8)
    return pattern.repeat(n // pattern.numel() + 1)[:n]


def gather_layers():
    """(bnb layers, NF4Linear copies): plain NF4, bf16 quant_storage, NaN-patterned bytes."""
    import bitsandbytes as bnb
    import torch

    from baton.training.nf4_params import NF4Linear

    torch.manual_seed(0)
    layers = []
    for storage, crafted in ((torch.uint8, False), (torch.bfloat16, False), (torch.uint8, True)):
        dense = torch.nn.Linear(320, 192, bias=True)
        layer = bnb.nn.Linear4bit(320, 192, bias=True, compute_dtype=torch.float32,
                                  compress_statistics=True, quant_type="nf4",
                                  quant_storage=storage)
        layer.load_state_dict(dense.state_dict())
        layer = layer.to("cpu")  # quantizes
        if crafted:
            data = layer.weight.data.view(torch.uint8).reshape(-1)
            data.copy_(nan_bytes(data.numel()))
            layer.weight.quant_state.absmax.copy_(nan_bytes(layer.weight.quant_state.absmax
                                                            .numel()))
        layers.append(layer)
    return layers, [NF4Linear.from_bnb(layer) for layer in layers]


def run_gather(task: dict, out: Path, rank: int) -> None:
    import bitsandbytes.functional as bnbf
    import torch
    from torch.distributed.fsdp import fully_shard

    layers, nf4 = gather_layers()
    want = [{n: p.detach().clone() for n, p in m.named_parameters()} for m in nf4]
    for module in nf4:
        fully_shard(module)
    local = [{n: p.to_local().clone() for n, p in m.named_parameters()} for m in nf4]
    for module in nf4:
        module.unshard()
    got = [{n: p.detach().clone() for n, p in m.named_parameters()} for m in nf4]
    # Baton's dequantization of the gathered bytes against bitsandbytes' of the originals.
    dq = [(m.dequantized(torch.float32), bnbf.dequantize_4bit(layer.weight.data,
                                                               layer.weight.quant_state))
          for m, layer in zip(nf4, layers)]
    torch.save({"want": want, "got": got, "local": local, "dequant": dq}, out / f"{task['name']}.{rank}.pt")


def resident_bytes(modules) -> int:
    """Parameter bytes FSDP2 holds on this rank now for the groups `modules`: every local
    shard, plus the unsharded copy of each group gathered at this moment."""
    from torch.distributed.fsdp._fully_shard._fsdp_param import ShardedState

    total = 0
    for module in modules:
        group = module._get_fsdp_state()._fsdp_param_group
        for fp in group.fsdp_params if group else []:
            local = fp.sharded_param.to_local()
            total += local.numel() * local.element_size()
            if fp.sharded_state == ShardedState.UNSHARDED:
                total += fp._orig_size.numel() * local.element_size()
    return total


def full_bytes(modules) -> list[int]:
    """Each group's unsharded parameter bytes."""
    return [sum(fp._orig_size.numel() * fp.sharded_param.element_size()
                for fp in m._get_fsdp_state()._fsdp_param_group.fsdp_params) for m in modules]


def run_train(task: dict, out: Path, rank: int) -> None:
    import torch

    from baton.state_schema import RunSpec
    from baton.training.engine import Trainer
    from baton.training.sharding import decoder_layers

    os.environ["BATON_KERNELS"] = "none"
    trainer = Trainer(RunSpec.from_json(task["spec"]), data_path=Path(task["data"]),
                      micro_batch_size=task["micro"], device="cpu",
                      sharding_mode=task.get("sharding", "ddp"))
    if task.get("load"):
        trainer.load(Path(task["load"]))
    grads, resident = [], []
    trainer.optimizer.register_step_pre_hook(lambda *_: grads.append(
        {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()
         if p.requires_grad and p.grad is not None}))
    sizes = {}
    if trainer.ddp is not None and hasattr(trainer.ddp, "sums_gradients"):
        from torch.distributed.fsdp import FSDPModule

        layers = decoder_layers(trainer.model)
        groups = [m for m in trainer.model.modules() if isinstance(m, FSDPModule)]
        sizes = {"layers": full_bytes(layers), "all": sum(full_bytes(groups))}
        for layer in layers:  # (the decoder layers' bytes, every group's bytes) at each forward
            layer.register_forward_pre_hook(lambda *_: resident.append(
                (resident_bytes(layers), resident_bytes(groups))))
    steps = []
    while trainer.cursor.step < task["until"]:
        result = trainer.train_step()
        steps.append({"step": result.step, "loss": result.loss, "lr": result.lr,
                      "indices": trainer.last_indices, "epoch": trainer.cursor.epoch,
                      "position": trainer.cursor.epoch_position})
    evaluation = trainer.cursor.base_eval_loss  # the eval every first step measures
    if task.get("final"):
        trainer.save(Path(task["final"]))
    torch.save({"steps": steps, "grads": grads, "resident": resident, "eval": evaluation,
                "sizes": sizes, "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss},
               out / f"{task['name']}.{rank}.pt")


def run_tasks(job: dict, rank: int) -> None:
    out = Path(job["out"])
    for task in job["tasks"]:
        (run_gather if task["kind"] == "gather" else run_train)(task, out, rank)


def _rank_main(rank: int, job: dict, port: int) -> None:
    import torch
    import torch.distributed as td

    torch.set_num_threads(1)  # two ranks share the CI machine's cores
    td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                          world_size=job["world"])
    try:
        run_tasks(job, rank)
    finally:
        td.destroy_process_group()


def main(path: str) -> int:
    from tests.ddp_worker import free_port

    job = json.loads(Path(path).read_text())
    if job.get("world", 1) == 1:
        run_tasks(job, 0)
        return 0
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(job, free_port()), nprocs=job["world"], join=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
