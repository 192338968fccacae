"""More than one GPU: rank 0 runs the session, the other ranks follow.

Only rank 0 talks to the store and holds the lease, so the store sees one agent whatever the
number of GPUs; the other ranks train the steps rank 0 announces, each on its share of a batch.
launch.py starts the ranks (torch's elastic launcher) and stops them all when one dies.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional

from baton.state_schema import RunConfig, RunSpec, parse_duration

from .clock import parse_start, resolve_window
from .codes import DEFAULT_SESSION_LIMIT_S, FINISHED
from .launch import HOLDER_ENV

log = logging.getLogger("baton.session")

# The tensor collectives (DDP's all-reduces, the step's sums) run on the default group, NCCL
# on GPUs, whose watchdog aborts the process when one waits this long. Both sides enter them
# within a step of each other, so minutes are plenty there, but never for rank 0's words.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
WORD_SLACK_S = 600.0  # beyond the session's limit: a follower outwaits any rank 0 that lives


def word_wait_s(config: RunConfig, now: Optional[float] = None) -> float:
    """How long a follower waits for rank 0's next word: as long as the session may last.

    Before its first word (the plan) rank 0 takes the lease, pulls the checkpoint and the data
    (store retries included) and probes the kernels; before "stop" it commits synchronously.
    Each may take longer than NCCL's 10 minutes, none longer than the session. A rank 0 that
    dies instead is seen by the launcher within a second, which stops every rank."""
    now = time.time() if now is None else now
    window = resolve_window(parse_start(config.session.start, now=now),
                            parse_duration(config.session.limit), agent_start=now)
    return (window.limit or DEFAULT_SESSION_LIMIT_S) + WORD_SLACK_S


class Ranks:
    """The ranks of a data-parallel session (agent.py starts one process a GPU). Rank 0 alone
    talks to the store; it broadcasts the plan (spec, data, checkpoint), then one word before
    each collective the others must join: "step", "eval" (eval is collective), "stop".

    The words travel over their own gloo group whose timeout is the session's length
    (`word_wait_s`), not over the default group: a follower waiting on NCCL for a slow pull
    would be aborted by NCCL's watchdog after COLLECTIVE_TIMEOUT."""

    def __init__(self):
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        # The launcher's holder id, so that it can release the lease if rank 0 is killed.
        self.holder: Optional[str] = os.environ.get(HOLDER_ENV) if self.world > 1 else None
        self.words = None  # the process group of rank 0's words, once started
        self.mode = "ddp"  # or "fsdp": how the ranks split the model (session/sharding_plan.py)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return f" x{self.world} ranks ({self.mode.upper()})" if self.world > 1 else ""

    def start(self, word_timeout_s: float = DEFAULT_SESSION_LIMIT_S + WORD_SLACK_S) -> None:
        if self.world == 1:
            return
        import torch
        import torch.distributed as dist

        if torch.cuda.is_available():
            from baton.training.devices import rank_cuda_index
            from baton.training.dist import process_group_backend

            torch.cuda.set_device(rank_cuda_index())
            backend = process_group_backend(self.world, torch.cuda.device_count())
        else:  # CPU ranks (tests): share the cores instead of oversubscribing them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world))
            backend = "gloo"
        dist.init_process_group(backend, init_method="env://", timeout=COLLECTIVE_TIMEOUT)
        # gloo has no watchdog: a word waits until its own timeout, on the CPU (a pickle).
        self.words = dist.new_group(backend="gloo",
                                    timeout=timedelta(seconds=word_timeout_s))

    def tell(self, message) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.broadcast_object_list([message], src=0, group=self.words)

    def hear(self):
        import torch.distributed as dist

        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.words)
        return box[0]

    def plan(self, spec: RunSpec, data: Path, evaluation: Optional[Path],
             checkpoint: Optional[Path], kernels: Optional[str] = None,
             sharding: str = "ddp") -> None:
        """`kernels`: the path rank 0's probe chose; every rank trains on the same one, and
        splits the model as rank 0 decided (`sharding`: ddp or fsdp)."""
        self.tell({"spec": spec.model_dump_json(), "data": str(data), "checkpoint":
                   str(checkpoint) if checkpoint else None,
                   "eval": str(evaluation) if evaluation else None, "kernels": kernels,
                   "sharding": sharding})

    def close(self, code: int) -> None:
        """Rank 0 releases the followers. After a rank died the word cannot reach it: that is
        said, not raised, so the session's own error stays the one reported."""
        if self.world == 1:
            return
        import torch.distributed as dist

        try:
            if self.leader:
                self.tell("stop")
        except RuntimeError as exc:  # torch's DistBackendError and gloo's errors
            log.warning("could not tell the other ranks to stop (%s); the launcher stops them "
                        "(session code %s)", exc, code)
        finally:
            dist.destroy_process_group()


def follow(config: RunConfig, ranks: Ranks) -> int:
    """A rank other than 0: train the steps rank 0 announces on this rank's share."""
    for signum in (signal.SIGTERM, signal.SIGINT):  # rank 0 decides when to stop
        signal.signal(signum, signal.SIG_IGN)
    try:
        plan = ranks.hear()
        if plan == "stop":  # rank 0 ended before training; its exit code is the session's
            return FINISHED
        trainer = planned_trainer(plan, config.train.micro_batch_size, config.train.precision,
                                  config.data.padding_free)
        while (word := ranks.hear()) != "stop":
            if word == "step":
                trainer.train_step()
            elif word == "eval":  # the base model's before step 1, as rank 0 does
                trainer.measure_base() if trainer.needs_base else trainer.evaluate()
        return FINISHED
    finally:  # the session is over: the launcher's SIGTERM (another rank failed) may end us
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def planned_trainer(plan: dict, micro_batch_size: int, precision: str = "auto",
                    padding_free: bool = True):
    """The trainer rank 0 described: the same spec, data and checkpoint."""
    from baton.training.engine import Trainer

    trainer = Trainer(RunSpec.from_json(plan["spec"]), data_path=Path(plan["data"]),
                      eval_path=Path(plan["eval"]) if plan["eval"] else None,
                      micro_batch_size=micro_batch_size, precision=precision,
                      padding_free=padding_free, kernels=plan.get("kernels"),
                      sharding_mode=plan.get("sharding", "ddp"))
    if plan["checkpoint"]:
        trainer.load(Path(plan["checkpoint"]))
    return trainer
