"""Run a Trainer in a fresh process (or two, with gloo) for the resume and DDP tests.

    python tests/ddp_worker.py JOB.json

JOB holds: spec (RunSpec JSON text), data, model, micro, until (stop at this step), load (a
checkpoint folder or null), save_at (steps at which to save into out/<step>), final (folder for
the last save or null), world (1 or 2), log (a JSON file of what each step consumed).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train(job: dict) -> list[dict]:
    from baton.state_schema import RunSpec
    from baton.training import dist
    from baton.training.engine import Trainer

    spec = RunSpec.from_json(job["spec"])
    os.environ["BATON_KERNELS"] = "none"  # the plain HF modules on every rank
    trainer = Trainer(spec, data_path=Path(job["data"]), micro_batch_size=job["micro"],
                      device="cpu")
    if job.get("load"):
        trainer.load(Path(job["load"]))
    steps = []
    while trainer.cursor.step < job["until"]:
        result = trainer.train_step()
        shares = dist.gather_objects(trainer.last_rank_indices)
        steps.append({"step": result.step, "loss": result.loss, "lr": result.lr,
                      "indices": trainer.last_indices, "shares": shares,
                      "epoch": trainer.cursor.epoch, "position": trainer.cursor.epoch_position,
                      "ddp": trainer.ddp is not None})
        if result.step in job.get("save_at", []):
            trainer.save(Path(job["out"]) / str(result.step))
    if job.get("final"):
        trainer.save(Path(job["final"]))
    return steps


def _rank_main(rank: int, job: dict, port: int) -> None:
    import torch
    import torch.distributed as td

    torch.set_num_threads(1)  # two ranks share the CI machine's cores
    td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                          world_size=job["world"])
    try:
        steps = train(job)
        if rank == 0:
            Path(job["log"]).write_text(json.dumps(steps))
    finally:
        td.destroy_process_group()


def main(path: str) -> int:
    job = json.loads(Path(path).read_text())
    if job.get("world", 1) == 1:
        Path(job["log"]).write_text(json.dumps(train(job)))
        return 0
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(job, free_port()), nprocs=job["world"], join=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
