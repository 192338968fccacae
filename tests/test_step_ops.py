"""ATen ops a training step: Baton makes no more than HF + PEFT on the bench's configuration.

Counted, not timed (`scripts/bench_ops.py`): on a CPU each op is an OpenMP fork-join, on a GPU
at least one kernel launch, so a step of many small ops is slow under load whatever its FLOPs.
The bench's configuration: SmolLM2-135M (NF4, LoRA on every linear, gradient checkpointing),
the demo's chat records, micro-batch 8, sequences up to 512, fp32, one optimizer step, each
side built as `scripts/bench.py` builds it. Models of 1 and 2 of SmolLM2's 30 layers give the
count of one layer (the difference) and of everything else; 30 layers are the same code.
"""

from __future__ import annotations

import types

import pytest
import torch

from baton.scripts.bench_ops import count_ops, lm_head_shape


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from baton.scripts.demo_data import write_jsonl

    return write_jsonl(tmp_path_factory.mktemp("demo") / "demo_chat.jsonl", 400, chat=True)


def _truncated(real_model_dir, layers: int, folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(real_model_dir, num_hidden_layers=layers,
                                                 dtype=torch.float32)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(real_model_dir).save_pretrained(folder)
    return folder


def _step_ops(impl: str, model_dir, data) -> tuple[int, int]:
    """(ops, lm_head bytes read) of the first optimizer step of `impl`."""
    from baton.scripts.bench_data import run_spec
    from baton.scripts.bench_train import data_run

    spec = run_spec(model_dir, data, seq_len=512, micro=8, steps=1, seed=3407)
    args = types.SimpleNamespace(spec=spec, data=data, batch_size=8, device="cpu",
                                 precision="fp32", padding_free=True, steps=1, seed=3407)
    model, step = data_run(impl, args, torch.device("cpu"), {})
    with count_ops(lm_head_shape(model)) as ops:
        step()
    return ops.total, ops.lm_head_bytes


def test_baton_makes_no_more_ops_a_step_than_hf(real_model_dir, demo_data, tmp_path):
    counts = {}
    for layers in (1, 2):
        folder = _truncated(real_model_dir, layers, tmp_path / f"smollm2-{layers}")
        for impl in ("hf", "baton"):
            counts[impl, layers] = _step_ops(impl, folder, demo_data)
    per_layer = {impl: counts[impl, 2][0] - counts[impl, 1][0] for impl in ("hf", "baton")}
    rest = {impl: counts[impl, 1][0] - per_layer[impl] for impl in ("hf", "baton")}
    full = {impl: rest[impl] + 30 * per_layer[impl] for impl in ("hf", "baton")}
    assert per_layer["baton"] <= per_layer["hf"], (per_layer, rest)
    assert rest["baton"] <= rest["hf"], (per_layer, rest)
    assert full["baton"] <= full["hf"]
    # lm_head (tied to the embedding, fp32, frozen): read for the logits and for dx, on each
    # side; Baton's one chunk holds every label row of the micro-batch.
    head = 49152 * 576 * 4
    assert counts["baton", 1][1] == counts["hf", 1][1] == 2 * head
