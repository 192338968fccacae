"""fp16 overflow: the residual stream stays fp32, a non-finite step trains nothing, and K of them
in a row end the session with exit 1 while HEAD stays on the last good checkpoint.

The overflows are real fp16 arithmetic under the CPU's fp16 autocast, not injected NaNs: a tiny
Qwen2 whose outlier dimension sums past 65504 across one layer, and a LoRA B too large for
fp16 (`tests.faults.blow_up_lora`, the hook `BATON_OVERFLOW_AT` installs in an agent).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.agent_helpers import open_run, write_config, write_data
from tests.faults import blow_up_lora, overflowing
from tests.inprocess import run_session_here
from tests.fixtures_tiny import make_spec, make_trainer

OUTLIER = 40000.0  # fp16-representable, as Qwen's massive activations are


def outlier_qwen2(fp32_stream: bool):
    """A tiny Qwen2 whose dimension 0 is 40000 in every embedding and to which layer 0's MLP
    adds 32768 (fp16 can hold each, not their sum), embeddings and lm_head in fp16."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from baton.training.model import residual_stream_fp32

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
        tie_word_embeddings=False))
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = OUTLIER
        mlp = model.model.layers[0].mlp
        mlp.gate_proj.weight[:, 0] = 1.0  # the normed outlier is ~8: silu(8) * 8 = 64 a unit
        mlp.up_proj.weight[:, 0] = 1.0
        mlp.down_proj.weight[0, :] = 4.0  # 128 units * 64 * 4 = 32768 onto dimension 0
    for module in (model.model.embed_tokens, model.lm_head):
        module.to(torch.float16)
    if fp32_stream:
        residual_stream_fp32(model)
    return model


def test_the_fp32_residual_stream_keeps_an_fp16_outlier_finite():
    """The measurement behind the choice (training.model.residual_stream_fp32): an fp16 stream
    overflows at layer 0 (loss NaN); an fp32 stream gives the fp32 model's loss; the cost is
    exactly 2x the bytes of each layer's input, what gradient checkpointing keeps."""
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    results = {}
    for stream in (False, True):
        model = outlier_qwen2(stream)
        seen: list[tuple[float, int]] = []  # (max |layer output|, bytes of the layer input)
        for layer in model.model.layers:
            layer.register_forward_hook(lambda _m, args, out: seen.append(
                (float(out.detach().abs().max()), args[0].numel() * args[0].element_size())))
        with torch.autocast("cpu", dtype=torch.float16):
            loss = float(model(input_ids=ids, labels=ids).loss)
        results[stream] = (loss, seen)
    plain = outlier_qwen2(False).float()
    fp32_loss = float(plain(input_ids=ids, labels=ids).loss)
    (loss16, seen16), (loss32, seen32) = results[False], results[True]
    print(f"fp16 stream: loss {loss16}, layer maxima {[m for m, _ in seen16]}; fp32 stream: "
          f"loss {loss32}, maxima {[m for m, _ in seen32]}; fp32 model {fp32_loss}")
    assert math.isinf(seen16[0][0]) and math.isnan(loss16), "fp16 cannot hold 72768"
    assert seen32[0][0] == pytest.approx(OUTLIER + 32768, rel=1e-3)
    assert loss32 == pytest.approx(fp32_loss, abs=1e-4)
    assert [b for _, b in seen32] == [2 * b for _, b in seen16] == [32 * 64 * 4] * 2


def test_a_non_finite_step_trains_nothing_and_counts_its_samples_as_skipped(tiny_model_dir,
                                                                            pairs_file):
    """A forward overflow under fp16: the step is skipped (weights, schedule and the scaler's
    scale stay), the cursor moves the data order on but counts the samples as skipped, not
    seen, and logs no NaN (JSON has none); the guard ends it at the 3rd in a row."""
    from baton.session.overflow import LossGuard, NonFiniteLossError

    spec = make_spec(tiny_model_dir, pairs_file, max_steps=8, warmup=0.5)
    trainer = make_trainer(spec, pairs_file, precision="fp16")
    first = trainer.train_step()
    guard = LossGuard("fp16")
    guard.observe(first.step, first.loss)
    seen, lr, scale = trainer.cursor.samples_seen, trainer.scheduler.get_last_lr(), \
        trainer.scaler.get_scale()
    assert blow_up_lora(trainer.model) > 0
    before = [p.detach().clone() for p in trainer.params]
    for n in (2, 3):
        bad = trainer.train_step()
        assert bad.skipped and not math.isfinite(bad.loss)
        guard.observe(bad.step, bad.loss)
        assert not guard.clean and guard.streak == n - 1
    c = trainer.cursor
    assert (c.step, c.skipped_steps, c.scheduler_step) == (3, 2, 1)
    assert c.samples_seen == seen and c.skipped_samples == 2 * spec.train.batch_size
    assert c.epoch_position == 3 * spec.train.batch_size, "the data order moved on"
    assert [s for s, _ in c.losses] == [1] and json.loads(c.to_json())["loss"] == first.loss
    assert trainer.scheduler.get_last_lr() == lr and trainer.scaler.get_scale() == scale
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params))
    with pytest.raises(NonFiniteLossError, match=r"--precision fp32.*--precision bf16"):
        guard.observe(4, trainer.train_step().loss)


def test_three_non_finite_losses_end_the_session_on_the_last_good_checkpoint(
        tmp_path, tiny_model_dir, monkeypatch, capsys):
    """A session in fp16 whose forward overflows from step 3 on (BATON_OVERFLOW_AT=3's hook):
    exit 1 at step 5 naming the fix, HEAD on the step-1 checkpoint (taken right after the
    first step), whose cursor counts only trained samples; the record counts the 3 non-finite
    steps; the lease is released."""
    from baton.training.engine import Trainer

    monkeypatch.setattr(Trainer, "train_step", overflowing(Trainer.train_step, 3))
    store = str(tmp_path / "store")
    config = write_config(tmp_path, model_dir=tiny_model_dir, store=store,
                          train_file=write_data(tmp_path / "d.jsonl"),
                          train={"max_steps": 20, "precision": "fp16"})
    code = run_session_here(config, tmp_path / "work")
    out = capsys.readouterr()
    assert code == 1, out.out + out.err
    assert "inf/NaN at 3 steps in a row (steps 3-5) under fp16" in out.err
    assert "--precision fp32" in out.err and "HEAD stays on checkpoint 00000001" in out.err
    runstore = open_run(store)
    head = runstore.read_head()[0]
    assert head.step == 1
    cursor = json.loads(runstore.store.read(
        runstore.checkpoint_key(head.checkpoint, "cursor.json")).data)
    assert cursor["skipped_samples"] == 0 and cursor["samples_seen"] == 2
    (record,) = runstore.read_sessions()
    assert record.exit_code == 1 and record.nonfinite_steps == 3 and record.end_step == 5
    assert all(math.isfinite(loss) for _, loss in record.losses)
    assert runstore.read_lease()[0].released
    from rich.console import Console

    from baton.session.status import collect_status, render

    console = Console(record=True, width=200)
    render(collect_status(runstore.store, "t"), console)
    assert f"0->5 ({record.skipped_steps} skipped)" in console.export_text()
    assert record.skipped_steps >= 3, "the 3 non-finite ones, and any fp16 gradient overflow"
