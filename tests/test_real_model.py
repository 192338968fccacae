"""A real pretrained model end to end: SmolLM2-135M-Instruct (Llama, 30 layers, grouped-query
attention 9/3 heads, tied embeddings, a ChatML template), from the PyPI cache of
scripts/real_model.py.

One short run (chat data, seq 64, 6 steps) is handed from session to session in fresh processes
with another micro-batch; the tests then read it as a user would: status, scripts/eval.py,
scripts/merge.py and plain PEFT. Every model load costs seconds on a CPU, so each is shared.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from tests.agent_helpers import RunningAgent, open_run, write_config
from tests.fixtures_tiny import make_spec, write_jsonl

# Minutes on an idle 2-core CPU; the timeout leaves room for a machine shared with other jobs.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

RUN = "real"


def sums(n: int = 32) -> list[dict]:
    """Chat records with a fixed answer shape the base model does not use: learnable in a few
    steps, so the held-out loss must fall below the base's."""
    return [{"messages": [
        {"role": "user", "content": f"What is {a} plus {b}?"},
        {"role": "assistant", "content": f"SUM[{a}+{b}] = {a + b}. Done."},
    ]} for a, b in ((i * 7 % 50, i * 3 % 40) for i in range(n))]


@pytest.fixture(scope="module")
def handoff_run(real_model_dir, tmp_path_factory) -> dict:
    """Session 1 pauses on SIGTERM after step 1; session 2, a fresh process with a fresh
    workdir and another micro-batch size, resumes and finishes the run."""
    folder = tmp_path_factory.mktemp("real-run")
    data = write_jsonl(folder / "sums.jsonl", sums())
    store = str(folder / "store")
    config = write_config(
        folder, model_dir=real_model_dir, train_file=data, store=store, run=RUN,
        model={"name": str(real_model_dir), "load_in_4bit": True},
        lora={"r": 8, "alpha": 16}, data={"format": "chat", "eval": 0.125, "max_seq_len": 64},
        train={"max_steps": 4, "batch_size": 4, "micro_batch_size": 4, "lr": 4e-3,
               "warmup": 0.0, "schedule": "constant"},
        checkpoint={"every": "30m", "keep": 3, "optimizer": True})
    first = RunningAgent(config, workdir=folder / "work1")
    try:
        first.wait_for(r"^step 1/4 ", timeout=1200)
        first.proc.send_signal(signal.SIGTERM)
        assert first.finish(timeout=1200) == 75, first.text()
    finally:
        first.kill()
    second = RunningAgent(config, "--micro-batch-size", "2", workdir=folder / "work2")
    try:
        assert second.finish(timeout=1200) == 0, second.text()
    finally:
        second.kill()
    return {"store": store, "data": data, "folder": folder, "model": real_model_dir,
            "logs": [first.text(), second.text()]}


def test_real_tokenizer_and_chat_template_in_all_three_formats(real_model_dir):
    from transformers import AutoTokenizer

    from baton.training.encode import IGNORE, Encoder

    tok = AutoTokenizer.from_pretrained(real_model_dir)
    learned = lambda enc: tok.decode([t for t in enc.labels if t != IGNORE])  # noqa: E731
    chat = Encoder(tok, "chat", 128)({"messages": [
        {"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."},
        {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Eleven."}]})
    text = tok.decode(chat.input_ids)
    assert text.startswith("<|im_start|>system\n")  # the template's own default system turn
    assert learned(chat) == "Seven.<|im_end|>\nEleven.<|im_end|>\n"  # assistant turns only
    pairs = Encoder(tok, "pairs", 128)({"prompt": "2+2=", "completion": "4"})
    assert learned(pairs) == "4<|im_end|>" and tok.decode(pairs.input_ids) == "2+2=4<|im_end|>"
    plain = Encoder(tok, "text", 128)({"text": "import os"})
    assert plain.labels == plain.input_ids and tok.decode(plain.input_ids) == "import os<|im_end|>"


def test_two_session_handoff_ends_below_the_base_eval_loss(handoff_run):
    from baton.session.status import collect_status
    from baton.handoff import open_store

    status = collect_status(open_store(handoff_run["store"]), RUN)
    assert status["state"] == "finished" and status["step"] == 4
    first, second = status["sessions"]
    assert (first["exit_code"], second["exit_code"]) == (75, 0)
    assert second["start_step"] == first["end_step"] >= 1
    assert status["base_eval_loss"] is not None and status["eval_loss"] is not None
    assert status["eval_loss"] < status["base_eval_loss"], status


def test_sessions_say_one_line_and_account_for_their_time(handoff_run):
    """A plain log (not a terminal) gets one line for the model load: no "Loading weights"
    bar, no FutureWarning; each session's timed parts add up to its wall-clock within 2%."""
    for log in handoff_run["logs"]:
        assert "Loading weights" not in log and "FutureWarning" not in log, log
        assert len([line for line in log.splitlines() if line.startswith("model loaded in ")]) == 1
    for rec in open_run(handoff_run["store"], RUN).read_sessions():
        t = rec.timings
        assert abs(t.unaccounted) <= 0.02 * t.wall, t
        assert t.model_load > 0 and t.first_step > 0 and t.eval > 0 and t.final_commit > 0


def test_eval_script_stores_the_before_after(handoff_run, evaluated):
    from baton.scripts.eval import verdict

    result = evaluated
    assert set(result) >= {"checkpoint", "eval_records", "base", "tuned", "samples"}
    assert result["tuned"]["loss"] < result["base"]["loss"]
    assert result["base"]["tokens"] == result["tuned"]["tokens"] > 0
    assert set(result["samples"][0]) == {"prompt", "reference", "base", "tuned"}
    assert "SUM[" in result["samples"][0]["tuned"]  # the tuned model answers in the new shape
    assert verdict(result).startswith("verdict: the fine-tune helps")
    stored = open_run(handoff_run["store"], RUN).store.read(
        f"{RUN}/evals/{result['checkpoint']}.json")
    assert json.loads(stored.data)["tuned"] == result["tuned"]


def test_eval_script_refuses_a_run_with_nothing_held_out(real_model_dir, tmp_path, capsys):
    from baton.handoff.runstore import RunStore
    from baton.handoff import open_store
    from baton.scripts.eval import main

    data = write_jsonl(tmp_path / "d.jsonl", sums(4))
    spec = make_spec(real_model_dir, data, fmt="chat", eval_=0.0, max_steps=1)
    RunStore(open_store(str(tmp_path / "store")), spec.run).create_spec(spec)
    assert main(["--store", str(tmp_path / "store"), "--run", spec.run]) == 2
    assert "data.eval" in capsys.readouterr().err


def test_merge_keeps_the_embeddings_tied_and_plain_transformers_reloads(handoff_run, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from baton.scripts.merge import main

    assert main(["--store", handoff_run["store"], "--run", RUN, "--out", str(tmp_path / "m"),
                 "--dtype", "float32"]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # The adapter never touched the shared matrix: LoRA on the linear layers only.
    ckpt = Path(handoff_run["folder"]) / "pulled"
    from baton.handoff.checkpoint import pull_checkpoint

    pull_checkpoint(open_run(handoff_run["store"], RUN), ckpt)
    with safe_open(ckpt / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and not [k for k in keys if "embed" in k or "lm_head" in k]


@pytest.fixture(scope="module")
def evaluated(handoff_run, tmp_path_factory) -> dict:
    """scripts/eval.py on the run: Baton's own model (4-bit base, patched kernels) judged."""
    from baton.scripts.eval import main

    out = tmp_path_factory.mktemp("eval") / "eval.json"
    assert main(["--store", handoff_run["store"], "--run", RUN, "--prompts", "1",
                 "--max-new-tokens", "12", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_plain_peft_gives_the_loss_baton_measured(handoff_run, evaluated, tmp_path):
    """The run's adapter in plain transformers + plain PEFT (unpatched modules, same 4-bit
    base) gives the held-out loss that Baton's patched model (reference RoPE over grouped-query
    attention, 9 query heads on 3 KV heads; RMSNorm, SwiGLU, fused loss) measured in eval.py."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from baton.handoff.checkpoint import pull_named
    from baton.training.dataset import RunData
    from baton.training.encode import collate
    from baton.training.model import keep_training_layout

    runstore = open_run(handoff_run["store"], RUN)
    spec = runstore.read_spec()
    ckpt = pull_named(runstore, evaluated["checkpoint"], tmp_path / "ckpt").path
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(handoff_run["model"], quantization_config=quant,
                                                 dtype=torch.float32)
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()
    plain = PeftModel.from_pretrained(plain, ckpt)
    # On a CPU with AVX512-BF16, bitsandbytes repacks NF4 weights into a bf16 layout when
    # eval() runs; Baton keeps the training layout (as its eval did), so the plain model must
    # too, or the two compare different numerics (0.4412 against 0.4366 here).
    keep_training_layout(plain)
    plain = plain.eval()
    tok = AutoTokenizer.from_pretrained(handoff_run["model"])
    data = RunData(spec, handoff_run["data"])
    data.attach(tok)
    samples = data.eval_samples()
    batch = collate(samples, tok.pad_token_id)
    with torch.no_grad():
        logits = plain(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(),
                                             ignore_index=-100, reduction="sum")
    tokens = int((labels != -100).sum())
    assert tokens == evaluated["tuned"]["tokens"]
    assert float(loss) / tokens == pytest.approx(evaluated["tuned"]["loss"], abs=2e-4)
