#!/usr/bin/env python
"""One rank of a 2-rank gloo session whose rank 0 is slow to send the plan (tests/test_ranks.py).

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/words_worker.py \
        PULL_S COLLECTIVE_S OUT.json

The hooks a test needs, in this process only: session.ranks.COLLECTIVE_TIMEOUT (NCCL's 10
minutes) shortened to COLLECTIVE_S, and rank 0's pull stood in for by a sleep of PULL_S. The
follower first waits on the default group, as `hear()` did before the words had their own
group (it must time out), then hears the plan through `Ranks.hear()` (it must arrive).
"""

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def follower(ranks, out: dict) -> None:
    import torch.distributed as dist

    started = time.monotonic()
    try:
        dist.broadcast_object_list([None], src=0)  # the default group: the old way
        out["default_group"] = "answered"
    except RuntimeError as exc:  # gloo's timeout (NCCL's watchdog would abort instead)
        out["default_group"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    out["default_group_s"] = time.monotonic() - started
    out["plan"] = ranks.hear()
    out["plan_s"] = time.monotonic() - started
    out["last_word"] = ranks.hear()


def main(pull_s: float, collective_s: float, out_path: str) -> int:
    import torch

    from baton.session import ranks as ranks_module
    from baton.training import dist

    ranks_module.COLLECTIVE_TIMEOUT = timedelta(seconds=collective_s)
    ranks = ranks_module.Ranks()
    ranks.start(word_timeout_s=120)
    out = {"rank": ranks.rank, "sum": dist.sum_scalar(1.0, torch.device("cpu"))}
    try:
        if ranks.leader:
            time.sleep(pull_s)  # pulling the checkpoint and the data
            ranks.tell({"plan": "spec, data, checkpoint"})
        else:
            follower(ranks, out)
    finally:
        ranks.close(0)  # rank 0 says "stop"
    Path(out_path).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]))
