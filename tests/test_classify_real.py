"""The real model as a classifier: SmolLM2-135M-Instruct in NF4 with LoRA and a trained `score`
head sorts stdlib docstrings into the 8 packages they come from (scripts/classify_data.py).

Two sessions of the real CLI hand the run over (session 1 pauses on SIGTERM, session 2 resumes
in a fresh process with a fresh workdir and another micro-batch); then eval.py, status and
merge.py read it as a user would. The one real-model test of classification: keep it short.
"""

from __future__ import annotations

import json
import signal

import pytest

from tests.agent_helpers import RunningAgent, write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

RUN = "docstrings"
STEPS = 8


@pytest.fixture(scope="module")
def classified(real_model_dir, tmp_path_factory) -> dict:
    from baton.scripts.classify_data import records, write

    folder = tmp_path_factory.mktemp("real-cls")
    data = write(folder / "docstrings.jsonl", records(per_class=20))
    store = str(folder / "store")
    config = write_config(
        folder, model_dir=real_model_dir, train_file=data, store=store, run=RUN,
        task="classification", model={"name": str(real_model_dir), "load_in_4bit": True},
        lora={"r": 8, "alpha": 16}, data={"eval": 0.2, "max_seq_len": 40},
        train={"max_steps": STEPS, "batch_size": 8, "micro_batch_size": 8, "lr": 3e-3,
               "warmup": 0.0, "schedule": "constant", "optimizer": "adamw"},
        checkpoint={"every": "30m", "keep": 3, "optimizer": True})
    first = RunningAgent(config, workdir=folder / "work1")
    try:
        first.wait_for(rf"^step {STEPS // 2}/{STEPS} ", timeout=1200)
        first.proc.send_signal(signal.SIGTERM)
        assert first.finish(timeout=1200) == 75, first.text()
    finally:
        first.kill()
    second = RunningAgent(config, "--micro-batch-size", "4", workdir=folder / "work2")
    try:
        assert second.finish(timeout=1200) == 0, second.text()
    finally:
        second.kill()
    return {"store": store, "folder": folder}


def test_two_sessions_then_eval_beats_both_baselines_and_status_shows_accuracy(classified):
    from baton.handoff import open_store
    from baton.scripts.eval import main
    from baton.session.status import collect_status

    status = collect_status(open_store(classified["store"]), RUN)
    assert status["state"] == "finished" and status["step"] == STEPS
    first, second = status["sessions"]
    assert (first["exit_code"], second["exit_code"]) == (75, 0)
    assert second["start_step"] == first["end_step"] >= STEPS // 2
    out = classified["folder"] / "eval.json"
    assert main(["--store", classified["store"], "--run", RUN, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["labels"]) == 8 and result["eval_records"] == 32
    tuned = result["tuned"]
    assert tuned["accuracy"] > result["majority"]["accuracy"], result
    assert tuned["accuracy"] > result["base"]["accuracy"], result
    assert tuned["loss"] < result["base"]["loss"]
    assert status["eval_accuracy"] == pytest.approx(tuned["accuracy"])
    assert (classified["folder"] / "eval.confusion.png").stat().st_size > 1000


def test_merge_writes_a_plain_sequence_classifier(classified, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from baton.scripts.merge import main

    assert main(["--store", classified["store"], "--run", RUN, "--out", str(tmp_path / "m"),
                 "--dtype", "float32"]) == 0  # its own check: logits of merged = base + adapter
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m")
    assert type(merged).__name__ == "LlamaForSequenceClassification"
    assert merged.config.num_labels == 8 and merged.config.pad_token_id is not None
    assert sorted(merged.config.label2id) == sorted(merged.config.id2label.values())
