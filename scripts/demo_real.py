"""Helpers of the default `make demo` (scripts/demo.py): SmolLM2-135M-Instruct's run.yaml, and
the before/after judgement by scripts/eval.py. scripts/demo.py owns the folder and sessions. The
model comes from the PyPI cache of scripts/real_model.py; the data are chat records made from
the standard library (scripts/demo_data.py); the run ends with scripts/eval.py, which prints
the base model's held-out loss beside the fine-tune's and a held-out prompt answered by both.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from baton.session.codes import OK

ROOT = Path(__file__).resolve().parent.parent


RUN = "demo"


def write_config(out: Path, model: Path, steps: int) -> Path:
    """run.yaml as a user would write it for this model (the data path is relative to it)."""
    import yaml

    config = {
        "run": RUN, "store": str(out / "store"),
        "model": {"name": str(model), "revision": "main", "load_in_4bit": True},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        # Most stdlib functions fit in 192 tokens with the prompt; longer ones are cut.
        "data": {"train": "data/train.jsonl", "format": "chat", "eval": 0.1,
                 "max_seq_len": 192, "packing": False},
        "train": {"max_steps": steps, "batch_size": 8, "micro_batch_size": 8, "lr": 1.0e-3,
                  "schedule": "cosine", "warmup": 0.1, "optimizer": "adamw",
                  "max_grad_norm": 1.0, "weight_decay": 0.0, "seed": 3407},
        "checkpoint": {"every": "10m", "keep": 2, "optimizer": True},
        "session": {"limit": None},
    }
    path = out / "run.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def evaluate(out: Path) -> dict:
    """scripts/eval.py on the demo's run, in its own process as a person would run it."""
    command = [sys.executable, str(ROOT / "scripts" / "eval.py"), "--store", str(out / "store"),
               "--run", RUN, "--prompts", "1", "--max-new-tokens", "48",
               "--json", str(out / "eval.json")]
    print("$ " + " ".join(a.replace(str(ROOT) + "/", "") for a in command[1:]), flush=True)
    if subprocess.run(command, cwd=ROOT).returncode != OK:
        raise SystemExit("scripts/eval.py failed; see its message above")
    return json.loads((out / "eval.json").read_text())
