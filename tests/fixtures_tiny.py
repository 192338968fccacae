"""Shared helpers for training tests: a tiny local Llama, small data files, a RunSpec.

The fixtures (`tiny_model_dir`, `pairs_file`) come through conftest's `pytest_plugins`, so the
tiny model is built once per test session (about a second) and reused; import the helpers.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(ROOT / "scripts"))


def pairs_records(n: int = 24) -> list[dict]:
    ops = ["+", "-", "*", "//"]
    return [{"prompt": f"def f{i}(x):\n", "completion": f"    return x {ops[i % 4]} {i}\n"}
            for i in range(n)]


def text_records(n: int = 24) -> list[dict]:
    return [{"text": f"import os\nvalue_{i} = os.path.join('a', '{i}')\n"} for i in range(n)]


def chat_records(n: int = 12) -> list[dict]:
    return [{"messages": [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": f"add {i}"},
        {"role": "assistant", "content": f"x + {i}"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": f"x + {i + 1}"},
    ]} for i in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_spec(model_dir: Path, data_path: Path, *, fmt: str = "pairs", batch_size: int = 4,
              max_steps: Optional[int] = None, epochs: Optional[float] = None,
              optimizer_state: bool = True, eval_: object = 0.125, dropout: float = 0.0,
              packing: bool = False, max_seq_len: int = 64, schedule: str = "cosine",
              warmup: float = 0.2, eval_sha: Optional[str] = None):
    from baton.state_schema import DataSpec, LoraConfig, ModelConfig, RunSpec, TrainSpec
    from baton.training.data import fingerprint
    from baton.training.model import resolve_revision

    sha = fingerprint(data_path)
    return RunSpec(
        run="tiny",
        model=ModelConfig(name=str(model_dir), revision=resolve_revision(str(model_dir), "main")),
        lora=LoraConfig(r=8, alpha=16, dropout=dropout, target_modules="all-linear"),
        data=DataSpec(source=str(data_path), key=f"tiny/data/{sha}.jsonl", sha256=sha,
                      format=fmt, eval=eval_, eval_sha256=eval_sha, max_seq_len=max_seq_len,
                      packing=packing),
        train=TrainSpec(max_steps=max_steps, epochs=epochs, batch_size=batch_size, lr=2e-3,
                        schedule=schedule, warmup=warmup, optimizer="adamw",
                        max_grad_norm=1.0, weight_decay=0.01, seed=7),
        optimizer_state=optimizer_state,
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tiny_model import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", pairs_records())


@contextmanager
def kernel_path(choice: str):
    """BATON_KERNELS for the span of a model build: 'none' trains the plain HF and PEFT
    modules, 'auto' what the agent picks for the device (the reference path on a CPU)."""
    with mock.patch.dict(os.environ, {"BATON_KERNELS": choice}):
        yield


def make_trainer(spec, data_path: Path, *, micro: int = 2, kernels: str = "none", **kw):
    """A CPU trainer of `spec` (its model is the spec's local folder)."""
    from baton.training.engine import Trainer

    with kernel_path(kernels):
        return Trainer(spec, data_path=data_path, micro_batch_size=micro, device="cpu", **kw)
