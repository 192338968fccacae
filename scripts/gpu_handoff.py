"""The GPU check's handoff part: one run, session 1 in fp16 stopped part way, session 2 in bf16.

Session 1 (`agent.py run --precision fp16`) gets SIGTERM once it has logged a third of the
steps, as a preempted notebook does, and must pause (exit 75); session 2 (`--precision bf16`,
an empty work folder, as on another machine) must finish (exit 0). Checked from the store:
session 2 starts at the step session 1 ended on, the sessions record fp16 and bf16, and every
learning rate either session logged is the schedule's own at that step (recomputed here with
`training.optim.make_scheduler` from the run's stored spec). A tiny local model, NF4, random
weights: nothing is downloaded.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = "gpu-check"
STEP_LINE = re.compile(r"^step (\d+)/(\d+) loss \S+ lr (\S+)")
PAUSED, FINISHED = 75, 0


class HandoffFailed(Exception):
    pass


def _build(work: Path, steps: int) -> Path:
    """A tiny model, `steps` batches of data and a run.yaml in `work`."""
    import yaml

    from scripts.demo_data import write_jsonl
    from scripts.tiny_model import build_tiny

    data = write_jsonl(work / "data" / "train.jsonl", count=4 * steps)
    model = build_tiny(work / "model", "llama")
    config = {
        "run": RUN, "store": str(work / "store"),
        "model": {"name": str(model), "revision": "main", "load_in_4bit": True},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": "data/train.jsonl", "format": "pairs", "eval": 0.0,
                 "max_seq_len": 128, "packing": False},
        "train": {"max_steps": steps, "batch_size": 4, "micro_batch_size": 4, "lr": 5.0e-3,
                  "schedule": "linear", "warmup": 0.2, "optimizer": "adamw",
                  "max_grad_norm": 1.0, "weight_decay": 0.0, "seed": 3407},
        "checkpoint": {"every": "1h", "keep": 3, "optimizer": True},
        "session": {"limit": None},
    }
    path = work / "run.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _session(config: Path, workdir: Path, precision: str, log: Path, deadline: float,
             stop_at: int | None) -> tuple[int, list[tuple[int, str]]]:
    """One agent session; SIGTERM once step `stop_at` is logged. (exit code, (step, lr) lines)."""
    args = [sys.executable, str(ROOT / "agent.py"), "run", "--config", str(config),
            "--precision", precision, "--workdir", str(workdir), "--log-every", "0",
            "--session-start", "now"]
    lines: list[tuple[int, str]] = []
    with log.open("w") as handle:
        handle.write("$ " + " ".join(args) + "\n")
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        signalled = False
        try:
            for line in proc.stdout:
                handle.write(line)
                match = STEP_LINE.match(line)
                if match:
                    lines.append((int(match.group(1)), match.group(3)))
                    if stop_at and not signalled and int(match.group(1)) >= stop_at:
                        proc.send_signal(signal.SIGTERM)
                        signalled = True
                if time.monotonic() > deadline:
                    raise HandoffFailed(f"session ({precision}) ran past the part's budget")
            return proc.wait(timeout=max(1.0, deadline - time.monotonic())), lines
        except (HandoffFailed, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
            raise HandoffFailed(f"session ({precision}) ran past the part's budget; see {log}")


def _expected_lrs(store: Path, total: int) -> list[float]:
    import torch

    from state_schema import RunSpec
    from training.optim import make_scheduler

    spec = RunSpec.model_validate_json((store / RUN / "spec.json").read_text())
    lrs = []
    for step in range(total):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=spec.train.lr)
        make_scheduler(spec, opt, total, step)
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def _status(store: Path) -> dict:
    from handoff import open_store
    from session.status import collect_status

    s = open_store(str(store))
    try:
        return collect_status(s, RUN)
    finally:
        s.close()


def run_handoff(work: Path, logs: Path, deadline: float, *, dry_run: bool) -> dict:
    """Run and check the two sessions; raises HandoffFailed (a message) on any mismatch."""
    steps = 6 if dry_run else 30
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    logs.mkdir(parents=True, exist_ok=True)
    config = _build(work, steps)
    code1, lines1 = _session(config, work / "machine-a", "fp16", logs / "handoff_1_fp16.log",
                             deadline, stop_at=steps // 3)
    if code1 != PAUSED:
        raise HandoffFailed(f"session 1 (fp16) exited {code1}, expected {PAUSED}")
    code2, lines2 = _session(config, work / "machine-b", "bf16", logs / "handoff_2_bf16.log",
                             deadline, stop_at=None)
    if code2 != FINISHED:
        raise HandoffFailed(f"session 2 (bf16) exited {code2}, expected {FINISHED}")
    status = _status(work / "store")
    sessions = status["sessions"]
    precisions = [s.get("precision") for s in sessions]
    if precisions != ["fp16", "bf16"]:
        raise HandoffFailed(f"sessions recorded precisions {precisions}, not fp16 then bf16")
    paused, resumed = sessions[0]["end_step"], sessions[1]["start_step"]
    if paused != resumed or status["step"] != steps:
        raise HandoffFailed(f"session 1 ended at step {paused}, session 2 started at {resumed}, "
                            f"the run ended at {status['step']} of {steps}")
    expected = _expected_lrs(work / "store", steps)
    skipped = sum(s.get("skipped_steps") or 0 for s in sessions)
    wrong = [(step, lr, f"{expected[step - 1]:.3g}") for step, lr in lines1 + lines2
             if lr != f"{expected[step - 1]:.3g}"]
    if wrong and not skipped:
        raise HandoffFailed(f"logged learning rates differ from the schedule: {wrong[:5]}")
    return {
        "sessions": [{k: s.get(k) for k in ("precision", "start_step", "end_step", "exit_code",
                                            "kernels", "tokens_per_s", "skipped_steps")}
                     for s in sessions],
        "lr_checked_steps": len(lines1) + len(lines2), "lr_mismatches": wrong[:5],
        "skipped_steps": skipped,
        "summary": (f"fp16 paused at step {paused}, bf16 resumed at {resumed} and finished "
                    f"{steps}; {len(lines1) + len(lines2)} logged LRs match the schedule"
                    + (f" ({len(wrong)} differ: {skipped} skipped fp16 steps)" if wrong else "")),
    }
