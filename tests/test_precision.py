"""The precision paths of a GPU, run on the CPU: fp16 with a loss scaler, bf16, fp32.

PyTorch's CPU autocast runs fp16 and bf16 and `GradScaler("cpu")` steps, so the code a T4
(fp16 + scaler) or an A100 (bf16) runs is exercised here: a skipped step, a handoff across
precisions, 8-bit AdamW and the embeddings kept in the compute dtype.
"""

from __future__ import annotations

import pytest
import torch

from tests.fixtures_tiny import make_spec, make_trainer

# A 4-bit tiny Llama: losses of fp16/bf16 against fp32 after a few steps differ by rounding.
# Measured on this CPU: fp16 4e-5, bf16 1e-3 over the first 3 steps; these bounds give room.
MIXED_LOSS_ATOL = {"fp16": 2e-3, "bf16": 1e-2}


def run(trainer, steps: int) -> list:
    return [trainer.train_step() for _ in range(steps)]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_trains_like_fp32(tiny_model_dir, pairs_file, precision):
    spec = make_spec(tiny_model_dir, pairs_file, max_steps=3)
    reference = [r.loss for r in run(make_trainer(spec, pairs_file, precision="fp32"), 3)]
    trainer = make_trainer(spec, pairs_file, precision=precision)
    assert trainer.device_info.precision == precision
    assert (trainer.scaler is not None) == (precision == "fp16")  # the scaler only for fp16
    losses = [r.loss for r in run(trainer, 3)]
    assert losses == pytest.approx(reference, abs=MIXED_LOSS_ATOL[precision])
    assert all(p.dtype == torch.float32 for p in trainer.params), "LoRA weights stay fp32"


def test_a_step_the_scaler_skips_is_counted_not_trained(tiny_model_dir, pairs_file):
    """Gradients that overflow fp16 make the scaler skip the optimizer step. The samples are
    consumed, the weights and the schedule stay put, and the cursor counts the skip."""
    spec = make_spec(tiny_model_dir, pairs_file, max_steps=4, warmup=0.5)
    trainer = make_trainer(spec, pairs_file, precision="fp16")
    run(trainer, 1)
    before = [p.detach().clone() for p in trainer.params]
    lr_before = trainer.scheduler.get_last_lr()[0]
    state = trainer.scaler.state_dict()
    trainer.scaler.load_state_dict({**state, "scale": 2.0 ** 120})  # overflows any gradient
    result = trainer.train_step()
    assert result.skipped and result.step == 2
    assert trainer.cursor.skipped_steps == 1 and trainer.cursor.scheduler_step == 1
    assert trainer.scheduler.get_last_lr()[0] == lr_before, "no schedule step for a skip"
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params))
    assert trainer.scaler.get_scale() == 2.0 ** 119, "the scaler backed off"
    trainer.scaler.load_state_dict(state)  # a sane scale again: the next step trains
    assert not trainer.train_step().skipped and trainer.cursor.scheduler_step == 2


def test_handoff_across_precisions_keeps_step_lr_order_and_scaler(tmp_path, tiny_model_dir,
                                                                  pairs_file):
    """A T4 session (fp16 + scaler) pauses, an A100 (bf16) resumes, then a CPU (fp32), then a
    T4 again: step, LR and data order are the uninterrupted run's, the scaler's state comes
    back with fp16, and the loss follows the fp32 run's."""
    spec = make_spec(tiny_model_dir, pairs_file, max_steps=8)
    whole = run(make_trainer(spec, pairs_file, precision="fp32"), 8)
    handed, scale, previous = [], None, None
    for segment, precision in enumerate(["fp16", "bf16", "fp32", "fp16"]):
        trainer = make_trainer(spec, pairs_file, precision=precision)
        if previous is not None:
            trainer.load(previous)
        if precision == "fp16" and scale is not None:
            assert trainer.scaler.get_scale() == scale, "the scaler's state is restored"
        handed += [(r, list(trainer.last_indices)) for r in run(trainer, 2)]
        if precision == "fp16":
            scale = trainer.scaler.get_scale()
        previous = tmp_path / f"segment-{segment}"
        trainer.save(previous)
    assert [r.step for r, _ in handed] == [r.step for r in whole]
    assert [r.lr for r, _ in handed] == [r.lr for r in whole]
    # Measured: at most 8.1e-4 from the fp32 run's losses over the 8 steps.
    assert [r.loss for r, _ in handed] == pytest.approx([r.loss for r in whole], abs=2e-3)


def test_adamw_8bit_steps_on_the_cpu_and_resumes_exactly(tmp_path, tiny_model_dir, pairs_file):
    """bitsandbytes' AdamW8bit (the default optimizer) on the CPU: its 8-bit moments, qmaps
    and absmax round-trip through the checkpoint, so a cut run ends bit-identical."""
    import bitsandbytes as bnb

    spec = make_spec(tiny_model_dir, pairs_file, max_steps=4)
    spec.train.optimizer = "adamw_8bit"
    whole = make_trainer(spec, pairs_file)
    assert isinstance(whole.optimizer, bnb.optim.AdamW8bit)
    run(whole, 4)
    first = make_trainer(spec, pairs_file)
    run(first, 2)
    first.save(tmp_path / "ck")
    second = make_trainer(spec, pairs_file)
    second.load(tmp_path / "ck")
    run(second, 2)
    assert all(torch.equal(a, b) for a, b in zip(whole.params, second.params))


def test_4bit_model_keeps_embeddings_in_the_compute_dtype(tiny_model_dir, pairs_file):
    """PEFT's kbit preparation upcasts embeddings and lm_head to fp32; Baton keeps them in
    the compute dtype (half the bytes) and the norms in fp32, and the loss does not move."""
    from baton.training.model import embeddings_in_compute_dtype

    spec = make_spec(tiny_model_dir, pairs_file, max_steps=2)
    trainer = make_trainer(spec, pairs_file, precision="bf16")
    base = trainer.model.get_base_model()
    assert base.get_input_embeddings().weight.dtype == torch.bfloat16
    assert base.get_output_embeddings().weight.dtype == torch.bfloat16
    norms = [m for n, m in base.named_modules() if n.endswith("norm")]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)
    upcast = make_trainer(spec, pairs_file, precision="bf16")
    embeddings_in_compute_dtype(upcast.model.get_base_model(), torch.float32)
    assert [r.loss for r in run(trainer, 2)] == pytest.approx(
        [r.loss for r in run(upcast, 2)], abs=1e-2)


def test_precision_policy_and_refusals():
    from baton.training.devices import PrecisionError, precision_for, resolve_precision

    assert [precision_for(c) for c in (None, (6, 0), (7, 5), (8, 0), (9, 0))] == [
        "fp32", "fp16", "fp16", "bf16", "bf16"]
    assert resolve_precision("auto", (7, 5)) == "fp16"
    assert resolve_precision("fp16", (9, 0)) == "fp16"
    with pytest.raises(PrecisionError, match="--precision fp16"):
        resolve_precision("bf16", (7, 5))  # a T4 "supports" bf16 only by slow emulation
