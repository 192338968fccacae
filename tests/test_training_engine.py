"""The trainer in one process: resume without optimizer state, loss normalisation, eval, ends."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures_tiny import make_spec, make_trainer
from baton.training.engine import CheckpointError, Trainer, total_steps


def trainer(spec, data, model, micro=2, kernels="none", **kw) -> Trainer:
    assert spec.model.name == str(model), "the spec names the model the trainer loads"
    return make_trainer(spec, data, micro=micro, kernels=kernels, **kw)


def run(t: Trainer, until: int) -> list[dict]:
    out = []
    while t.cursor.step < until:
        r = t.train_step()
        out.append({"step": r.step, "lr": r.lr, "loss": r.loss, "indices": t.last_indices,
                    "pos": (t.cursor.epoch, t.cursor.epoch_position)})
    return out


@pytest.mark.slow
def test_resume_without_optimizer_state_continues_step_lr_and_order(
        tmp_path, tiny_model_dir, pairs_file):
    spec = make_spec(tiny_model_dir, pairs_file, max_steps=8, optimizer_state=False)
    whole = run(trainer(spec, pairs_file, tiny_model_dir), 8)
    first = trainer(spec, pairs_file, tiny_model_dir)
    run(first, 5)
    first.save(tmp_path / "ck")
    assert not (tmp_path / "ck" / "optimizer.safetensors").exists()
    second = trainer(spec, pairs_file, tiny_model_dir)
    second.load(tmp_path / "ck")
    assert (second.cursor.step, second.cursor.epoch, second.cursor.epoch_position) == (5, 0, 20)
    resumed = run(second, 8)
    for got, want in zip(resumed, whole[5:]):
        assert (got["step"], got["lr"], got["indices"], got["pos"]) == (
            want["step"], want["lr"], want["indices"], want["pos"])
        # AdamW restarts its moments: the loss curve stays close, not equal.
        assert got["loss"] == pytest.approx(want["loss"], abs=0.05)


def test_gradient_does_not_depend_on_micro_batch_size(tiny_model_dir, pairs_file):
    spec = make_spec(tiny_model_dir, pairs_file, max_steps=4, batch_size=4)
    grads, losses = [], []
    for micro in (1, 4):
        t = trainer(spec, pairs_file, tiny_model_dir, micro=micro)
        # Move lora_B off zero so every LoRA weight gets a gradient.
        for p in t.params:
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
        samples = [t.data.sample(i) for i in range(4)]
        loss, _ = t._accumulate(samples)
        grads.append(torch.cat([p.grad.flatten() for p in t.params]))
        losses.append(loss)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_evaluate_uses_no_randomness_and_finishes(tiny_model_dir, pairs_file):
    spec = make_spec(tiny_model_dir, pairs_file, max_steps=2, dropout=0.1)
    t = trainer(spec, pairs_file, tiny_model_dir)
    state = torch.get_rng_state()
    loss = t.evaluate()
    assert torch.equal(state, torch.get_rng_state())
    assert 0 < loss < 20 and t.cursor.eval_loss == loss
    run(t, 2)
    assert t.finished
    with pytest.raises(RuntimeError, match="finished"):
        t.train_step()


def test_no_eval_split_gives_none(tiny_model_dir, pairs_file):
    spec = make_spec(tiny_model_dir, pairs_file, max_steps=1, eval_=None)
    t = trainer(spec, pairs_file, tiny_model_dir)
    assert t.evaluate() is None
    assert t.data.n_train == 24


def test_total_steps_from_epochs_or_max_steps(tiny_model_dir, pairs_file):
    assert total_steps(make_spec(tiny_model_dir, pairs_file, epochs=2.0), 21) == 11
    assert total_steps(make_spec(tiny_model_dir, pairs_file, max_steps=5), 21) == 5


def test_load_refuses_a_folder_that_is_no_checkpoint(tmp_path, tiny_model_dir, pairs_file):
    t = trainer(make_spec(tiny_model_dir, pairs_file, max_steps=2), pairs_file, tiny_model_dir)
    with pytest.raises(CheckpointError, match="cursor.json"):
        t.load(tmp_path)


def test_kernel_patching_is_recorded(tiny_model_dir, pairs_file):
    t = trainer(make_spec(tiny_model_dir, pairs_file, max_steps=2), pairs_file, tiny_model_dir,
                kernels="auto")
    assert t.device_info.kernels in ("triton", "reference", "none")
    assert t.device_info.precision == "fp32"
    result = t.train_step()
    assert result.step == 1 and torch.isfinite(torch.tensor(result.loss))


def test_evaluate_mid_run_does_not_change_training(tiny_model_dir, pairs_file):
    # bitsandbytes repacks NF4 weights for CPU inference in eval mode unless Baton stops it;
    # the repacked matmul has no autograd, which would silently change later steps.
    spec = make_spec(tiny_model_dir, pairs_file, max_steps=3)
    plain, evaluated = (trainer(spec, pairs_file, tiny_model_dir) for _ in range(2))
    run(plain, 1)
    run(evaluated, 1)
    evaluated.evaluate()
    assert run(plain, 3) == run(evaluated, 3)
    for a, b in zip(plain.params, evaluated.params):
        assert torch.equal(a, b)


def test_resume_with_kernels_on_is_bit_identical_too(tmp_path, tiny_model_dir, pairs_file):
    # The agent trains with kernels="auto"; on the CPU that is the reference path.
    spec = make_spec(tiny_model_dir, pairs_file, max_steps=4, dropout=0.1)
    whole = trainer(spec, pairs_file, tiny_model_dir, kernels="auto")
    losses = [s["loss"] for s in run(whole, 4)]
    first = trainer(spec, pairs_file, tiny_model_dir, kernels="auto")
    run(first, 2)
    first.save(tmp_path / "ck")
    assert (tmp_path / "ck" / "optimizer.safetensors").is_file()
    second = trainer(spec, pairs_file, tiny_model_dir, kernels="auto")
    second.load(tmp_path / "ck")
    assert [s["loss"] for s in run(second, 4)] == losses[2:]
    for a, b in zip(whole.params, second.params):
        assert torch.equal(a, b)


def test_optimizer_state_of_another_optimizer_is_skipped(tmp_path, tiny_model_dir, pairs_file):
    from safetensors.torch import save_file

    spec = make_spec(tiny_model_dir, pairs_file, max_steps=4)
    t = trainer(spec, pairs_file, tiny_model_dir)
    run(t, 1)
    t.save(tmp_path / "ck")
    save_file({}, str(tmp_path / "ck" / "optimizer.safetensors"),
              metadata={"optimizer": "AdamW8bit", "param_groups": "[]", "scalars": "{}"})
    resumed = trainer(spec, pairs_file, tiny_model_dir)
    resumed.load(tmp_path / "ck")
    assert resumed.cursor.step == 1 and resumed.optimizer.state == {}
    assert resumed.train_step().step == 2


@pytest.mark.parametrize("fmt,packing", [("chat", False), ("text", True)])
def test_chat_and_packed_text_train(tmp_path, tiny_model_dir, fmt, packing):
    from tests.fixtures_tiny import chat_records, text_records, write_jsonl

    records = chat_records(12) if fmt == "chat" else text_records(24)
    data = write_jsonl(tmp_path / "d.jsonl", records)
    spec = make_spec(tiny_model_dir, data, fmt=fmt, packing=packing, max_seq_len=32,
                     epochs=1.0, batch_size=2)
    t = trainer(spec, data, tiny_model_dir, micro=1)
    if packing:  # blocks of at most 32 tokens of whole records, not records, are the samples
        stream = sum(len(t.data.encoder(r).input_ids) for r in t.data.train_records)
        blocks = [t.data.sample(i) for i in range(t.data.n_train)]
        assert sum(len(b.input_ids) for b in blocks) == stream
        assert all(len(b.input_ids) <= 32 for b in blocks)
        assert sum(b.position_ids.count(0) for b in blocks) == len(t.data.train_records)
    assert t.cursor.total_steps == -(-t.data.n_train // 2)
    first = t.train_step()
    assert first.tokens > 0 and 0 < first.loss < 20
    assert t.evaluate() > 0
