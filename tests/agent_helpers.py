"""Helpers to drive `agent.py run` as a subprocess, as a person (or a notebook cell) would.

The agent runs in its own process so that signals, exit codes and the lease behave exactly as
in a real session; the test reads the store afterwards to see what the agent committed.
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import yaml

ROOT = Path(__file__).resolve().parent.parent
# agent.py behind the test hooks of tests/faults.py (kill points, quick retries, short leases).
AGENT = ROOT / "tests" / "agent_entry.py"
WORDS = ("the quick brown fox jumps over a lazy dog while the model reads each line of data "
         "and learns its next token slowly").split()


def build_tiny_model(out: Path) -> Path:
    """The tiny Llama of scripts/tiny_model.py, built in a subprocess (no torch in pytest)."""
    subprocess.run([sys.executable, str(ROOT / "scripts" / "tiny_model.py"), str(out)],
                   check=True, capture_output=True, cwd=ROOT, timeout=300)
    return out


def write_data(path: Path, n: int = 32, seed: int = 0) -> Path:
    rnd = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            fh.write(json.dumps({"text": " ".join(rnd.choice(WORDS) for _ in range(16))}) + "\n")
    return path


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else value
    return out


def write_config(folder: Path, *, model_dir: Path, train_file: Path, store: str, run: str = "t",
                 **sections) -> Path:
    """A small, fast run.yaml: fp32 base (NF4 on CPU is slow), rank-4 LoRA, short samples."""
    config = {
        "run": run, "store": store,
        "model": {"name": str(model_dir), "load_in_4bit": False},
        "lora": {"r": 4, "alpha": 8},
        "data": {"train": str(train_file), "eval": 0.0, "max_seq_len": 32},
        "train": {"max_steps": 6, "batch_size": 2, "micro_batch_size": 2, "optimizer": "adamw",
                  "warmup": 0.0},
        "checkpoint": {"every": "30m", "keep": 3},
    }
    config = merge(config, sections)
    path = folder / f"{run}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def agent_env(*, lease_ttl: Optional[float] = None, **extra: str) -> dict[str, str]:
    """The environment of an agent under test: quick retries; a short lease when asked."""
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", BATON_TEST_RETRY="3,20", TOKENIZERS_PARALLELISM="false",
               **extra)
    if lease_ttl is not None:
        env["BATON_TEST_LEASE_TTL"] = str(lease_ttl)
    return env


def agent_command(config: Path, *flags: str, workdir: Path) -> list[str]:
    return [sys.executable, str(AGENT), "run", "--config", str(config), "--workdir",
            str(workdir), "--log-every", "0", *flags]


def run_agent(config: Path, *flags: str, workdir: Path, timeout: float = 300,
              env: Optional[dict] = None) -> subprocess.CompletedProcess:
    return subprocess.run(agent_command(config, *flags, workdir=workdir), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env=env or agent_env())


class RunningAgent:
    """An agent started in the background whose output the test can wait on, line by line."""

    def __init__(self, config: Path, *flags: str, workdir: Path,
                 lease_ttl: Optional[float] = None):
        self.proc = subprocess.Popen(
            agent_command(config, *flags, workdir=workdir), cwd=ROOT,
            env=agent_env(lease_ttl=lease_ttl),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, pattern: str, timeout: float = 240) -> re.Match:
        """The first output line matching `pattern`; AssertionError with the output if the
        agent exits or the time runs out first."""
        regex, deadline = re.compile(pattern), time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.output.append(line)
            if match := regex.search(line):
                return match
        raise AssertionError(f"no line matching {pattern!r}; output:\n{self.text()}")

    def finish(self, timeout: float = 240) -> int:
        code = self.proc.wait(timeout=timeout)
        while (line := self.lines.get(timeout=10)) is not None:
            self.output.append(line)
        return code

    def text(self) -> str:
        return "".join(self.output)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def open_run(uri: str, run: str = "t"):
    from baton.handoff import open_store
    from baton.handoff.runstore import RunStore

    return RunStore(open_store(uri), run)
