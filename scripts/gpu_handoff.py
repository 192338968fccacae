"""The GPU check's agent parts: a handoff between precisions, two ranks, the reference path.

Each runs the real `agent.py run` on a tiny local NF4 model with random weights (nothing is
downloaded) and 8-bit AdamW, and checks what the store then holds:
- `run_handoff`: session 1 (`--precision fp16`, a T4's) gets SIGTERM once it has logged a
  third of the steps, as a preempted notebook does, and must pause (exit 75); session 2 (bf16
  on sm_80 and newer, fp32 below, where the agent refuses bf16; an empty work folder, as on
  another machine) must finish (exit 0). Checked: session 2 starts at the step session 1
  ended on; each checkpoint's cursor has consumed exactly step x batch samples (the data
  order continues, nothing dropped or repeated); every learning rate either session logged
  is the schedule's own at that step (`training.optim.make_scheduler` from the stored spec);
  every logged loss is finite and the run's last loss is below its first; the last
  checkpoint's optimizer state holds 8-bit (uint8) AdamW tensors.
- `run_single`: one session to the end under an environment (`BATON_WORLD_SIZE=2`: two
  ranks on one GPU through the elastic launcher; `BATON_KERNELS=reference`: the plain-PyTorch
  path a P100 takes); exit 0, every step done, finite losses, the expected kernel path.
- `run_sharded`: two ranks on one GPU with the NF4 base sharded (`train.sharding: fsdp`), and
  one rank, both fp32 from the same fresh run; every step's logged loss within
  SHARDED_LOSS_TOL of the other's, the same learning rates.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
RUN = "gpu-check"
STEP_LINE = re.compile(r"^step (\d+)/(\d+) loss (\S+) lr (\S+)")
PAUSED, FINISHED = 75, 0
BATCH = 4
# fp32, two ranks against one: the sums differ in order only (1e-5 measured on the CPU); the
# logged loss has 4 decimals.
SHARDED_LOSS_TOL = 1e-3


class HandoffFailed(Exception):
    pass


def build_run(work: Path, steps: int) -> Path:
    """A tiny model, `steps` batches of data and a run.yaml in `work`."""
    import yaml

    from baton.scripts.demo_data import write_jsonl
    from baton.scripts.tiny_model import build_tiny

    write_jsonl(work / "data" / "train.jsonl", count=BATCH * steps)
    # hidden 512: LoRA A matrices of r x 512 = 4096 values, the size from which bitsandbytes'
    # AdamW8bit keeps 8-bit states (smaller tensors get 32-bit ones).
    model = build_tiny(work / "model", "llama", hidden=512, intermediate=1024, heads=8,
                       kv_heads=4)
    config = {
        "run": RUN, "store": str(work / "store"),
        "model": {"name": str(model), "revision": "main", "load_in_4bit": True},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": "data/train.jsonl", "format": "pairs", "eval": 0.0,
                 "max_seq_len": 128, "packing": False},
        "train": {"max_steps": steps, "batch_size": BATCH, "micro_batch_size": BATCH,
                  "lr": 5.0e-3, "schedule": "linear", "warmup": 0.2, "optimizer": "adamw_8bit",
                  "max_grad_norm": 1.0, "weight_decay": 0.0, "seed": 3407},
        "checkpoint": {"every": "1h", "keep": 3, "optimizer": True},
        "session": {"limit": None},
    }
    path = work / "run.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_session(config: Path, workdir: Path, precision: str, log: Path, deadline: float,
                stop_at: Optional[int] = None, env: Optional[dict] = None):
    """One agent session; SIGTERM once step `stop_at` is logged.
    Returns (exit code, [(step, loss, lr)] of the logged step lines, the whole output)."""
    args = [sys.executable, str(ROOT / "agent.py"), "run", "--config", str(config),
            "--precision", precision, "--workdir", str(workdir), "--log-every", "0",
            "--session-start", "now"]
    lines: list[tuple[int, str, str]] = []
    text: list[str] = []
    with log.open("w") as handle:
        handle.write("$ " + " ".join(args) + "\n")
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True, bufsize=1,
                                stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        # Killed at the deadline even while it prints nothing (a hang, a slow load).
        watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), proc.kill)
        watchdog.start()
        signalled = False
        try:
            for line in proc.stdout:
                handle.write(line)
                text.append(line)
                match = STEP_LINE.match(line)
                if match:
                    lines.append((int(match.group(1)), match.group(3), match.group(4)))
                    if stop_at and not signalled and int(match.group(1)) >= stop_at:
                        proc.send_signal(signal.SIGTERM)
                        signalled = True
            code = proc.wait()
        finally:
            watchdog.cancel()
        if time.monotonic() >= deadline:
            raise HandoffFailed(f"session ({precision}) ran past the part's budget; see {log}")
        return code, lines, "".join(text)


def _expected_lrs(store: Path, total: int) -> list[float]:
    import torch

    from baton.state_schema import RunSpec
    from baton.training.optim import make_scheduler

    spec = RunSpec.model_validate_json((store / RUN / "spec.json").read_text())
    lrs = []
    for step in range(total):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=spec.train.lr)
        make_scheduler(spec, opt, total, step)
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def _status(store: Path) -> dict:
    from baton.handoff import open_store
    from baton.session.status import collect_status

    s = open_store(str(store))
    try:
        return collect_status(s, RUN)
    finally:
        s.close()


def _cursors(store: Path) -> list[dict]:
    """Every stored checkpoint's cursor, by step."""
    found = [json.loads(p.read_text()) for p in (store / RUN / "checkpoints").glob("*/cursor.json")]
    return sorted(found, key=lambda c: c["step"])


def _check_samples(store: Path) -> list[int]:
    """Each checkpoint consumed exactly step x batch samples (skipped fp16 steps included,
    whether or not a schema counts their samples as trained); their steps."""
    steps = []
    for c in _cursors(store):
        done = c["samples_seen"]
        if done not in (c["step"] * BATCH, (c["step"] - c.get("skipped_steps", 0)) * BATCH):
            raise HandoffFailed(f"the checkpoint at step {c['step']} has consumed {done} "
                                f"samples, not {c['step'] * BATCH}: the data order broke")
        steps.append(c["step"])
    return steps


def _check_8bit(store: Path) -> int:
    """The uint8 (8-bit AdamW) state tensors in the last checkpoint's optimizer state."""
    from safetensors import safe_open

    files = sorted((store / RUN / "checkpoints").glob("*/optimizer.safetensors"))
    if not files:
        raise HandoffFailed("no checkpoint holds an optimizer state")
    with safe_open(str(files[-1]), "pt") as f:
        count = sum(f.get_slice(k).get_dtype() == "U8" for k in f.keys())
    if not count:
        raise HandoffFailed(f"{files[-1].parent.name}'s optimizer state has no 8-bit tensor: "
                            "the run did not train with AdamW8bit")
    return count


def _check_losses(lines: list[tuple[int, str, str]]) -> tuple[float, float]:
    """(first, last) logged loss, all finite. A step whose samples hold no label token logs
    0 by design (a mean over no token); those are left out of first and last."""
    losses = [float(loss) for _, loss, _ in lines]
    if not losses or not all(math.isfinite(x) for x in losses):
        raise HandoffFailed(f"logged losses are missing or not finite: {losses[:8]}")
    real = [x for x in losses if x != 0.0] or losses
    return real[0], real[-1]


def run_handoff(work: Path, logs: Path, deadline: float, *, dry_run: bool,
                second: str = "bf16") -> dict:
    """Run and check the two sessions (fp16, then `second`); raises HandoffFailed."""
    steps = 6 if dry_run else 30
    config = _fresh(work, logs, steps)
    code1, lines1, _ = run_session(config, work / "machine-a", "fp16",
                                   logs / "handoff_1_fp16.log", deadline, stop_at=steps // 3)
    if code1 != PAUSED:
        raise HandoffFailed(f"session 1 (fp16) exited {code1}, expected {PAUSED}")
    code2, lines2, _ = run_session(config, work / "machine-b", second,
                                   logs / f"handoff_2_{second}.log", deadline)
    if code2 != FINISHED:
        raise HandoffFailed(f"session 2 ({second}) exited {code2}, expected {FINISHED}")
    return _check_handoff(work / "store", lines1 + lines2, steps, second)


def _check_handoff(store: Path, lines: list, steps: int, second: str) -> dict:
    """Step, sample, learning-rate and loss continuity of the stored run."""
    status = _status(store)
    sessions = status["sessions"]
    precisions = [s.get("precision") for s in sessions]
    if precisions != ["fp16", second]:
        raise HandoffFailed(f"sessions recorded precisions {precisions}, not fp16 then {second}")
    paused, resumed = sessions[0]["end_step"], sessions[1]["start_step"]
    if paused != resumed or status["step"] != steps:
        raise HandoffFailed(f"session 1 ended at step {paused}, session 2 started at {resumed}, "
                            f"the run ended at {status['step']} of {steps}")
    checked = _check_samples(store)
    eight_bit = _check_8bit(store)
    expected = _expected_lrs(store, steps)
    skipped = sum(s.get("skipped_steps") or 0 for s in sessions)
    wrong = [(step, lr, f"{expected[step - 1]:.3g}") for step, _, lr in lines
             if lr != f"{expected[step - 1]:.3g}"]
    if wrong and not skipped:
        raise HandoffFailed(f"logged learning rates differ from the schedule: {wrong[:5]}")
    first, last = _check_losses(lines)
    if not last < first:
        raise HandoffFailed(f"the loss did not fall across the handoff: {first} -> {last}")
    return {
        "sessions": [{k: s.get(k) for k in ("precision", "start_step", "end_step", "exit_code",
                                            "kernels", "tokens_per_s", "skipped_steps")}
                     for s in sessions],
        "lr_checked_steps": len(lines), "lr_mismatches": wrong[:5], "skipped_steps": skipped,
        "sample_checked_steps": checked, "first_loss": first, "last_loss": last,
        "optimizer_8bit_tensors": eight_bit,
        "summary": (f"fp16 paused at step {paused}, {second} resumed at {resumed} and finished "
                    f"{steps}; samples exact at steps {checked}; {len(lines)} logged LRs match "
                    f"the schedule; {eight_bit} 8-bit AdamW states"
                    + (f" ({len(wrong)} differ: {skipped} skipped fp16 steps)" if wrong else "")
                    + f"; loss {first:.3f} -> {last:.3f}"),
    }


def _fresh(work: Path, logs: Path, steps: int) -> Path:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    logs.mkdir(parents=True, exist_ok=True)
    return build_run(work, steps)


def run_single(work: Path, logs: Path, deadline: float, *, name: str, env: dict,
               precision: str, kernels: str, expect_in_output: str = "",
               dry_run: bool) -> dict:
    """One session to the end under `env`; checks exit 0, all steps, finite losses, the
    recorded kernel path `kernels` and a line of the output (`expect_in_output`)."""
    steps = 2 if dry_run else 12
    config = _fresh(work, logs, steps)
    code, lines, text = run_session(config, work / "machine", precision, logs / f"{name}.log",
                                    deadline, env=env)
    if code != FINISHED:
        raise HandoffFailed(f"the session exited {code}, expected {FINISHED}; see logs/{name}.log")
    status = _status(work / "store")
    record = status["sessions"][-1]
    if status["step"] != steps or record.get("kernels") != kernels:
        raise HandoffFailed(f"the run ended at step {status['step']} of {steps} with kernels "
                            f"{record.get('kernels')!r}, expected {kernels!r}")
    if expect_in_output and expect_in_output not in text:
        raise HandoffFailed(f"the session never said {expect_in_output!r}; see logs/{name}.log")
    first, last = _check_losses(lines)
    return {"steps": steps, "kernels": record.get("kernels"), "precision": record.get("precision"),
            "tokens_per_s": record.get("tokens_per_s"), "first_loss": first, "last_loss": last,
            "summary": f"{steps} steps, kernels {record.get('kernels')}, {record.get('precision')}, "
                       f"loss {first:.3f} -> {last:.3f}"}


def run_sharded(work: Path, logs: Path, deadline: float, *, dry_run: bool) -> dict:
    """Two ranks on one GPU with the NF4 base sharded (`train.sharding: fsdp`, gloo) against
    one rank, both fp32 from the same fresh run: every logged loss and LR compared."""
    import yaml

    steps = 2 if dry_run else 4
    logged = {}
    for name, env in (("sharded", {"BATON_WORLD_SIZE": "2"}), ("one_rank", {})):
        config = _fresh(work / name, logs, steps)
        settings = yaml.safe_load(config.read_text())
        settings["train"]["sharding"] = "fsdp"  # one rank: nothing to shard, the plain base
        config.write_text(yaml.safe_dump(settings, sort_keys=False))
        code, lines, text = run_session(config, work / name / "machine", "fp32",
                                        logs / f"sharded_{name}.log", deadline, env=env)
        if code != FINISHED or len(lines) != steps:
            raise HandoffFailed(f"the {name} session exited {code} after {len(lines)} logged "
                                f"steps of {steps}; see logs/sharded_{name}.log")
        if env and "x2 ranks (FSDP)" not in text:
            raise HandoffFailed("the two-rank session never said 'x2 ranks (FSDP)'")
        logged[name] = lines
    return _compare_sharded(logged["sharded"], logged["one_rank"], steps)


def _compare_sharded(two: list, one: list, steps: int) -> dict:
    _check_losses(two)
    diffs = [abs(float(a[1]) - float(b[1])) for a, b in zip(two, one)]
    if [s for s, _, lr in two] != [s for s, _, lr in one] or \
            [lr for _, _, lr in two] != [lr for _, _, lr in one]:
        raise HandoffFailed(f"steps or learning rates differ: {two} against {one}")
    worst = max(diffs)
    if not worst <= SHARDED_LOSS_TOL:
        raise HandoffFailed(f"sharded losses differ from one rank's by {worst} "
                            f"(over {SHARDED_LOSS_TOL}): {two} against {one}")
    return {"steps": steps, "max_loss_diff": worst, "tolerance": SHARDED_LOSS_TOL,
            "losses": [float(loss) for _, loss, _ in two],
            "summary": f"{steps} steps, 2 sharded ranks vs 1: max loss diff {worst:.2g}"}
