"""Padding-free micro-batches: the same losses and LoRA gradients as padded ones, no pad
token computed, no (sum of lengths)^2 mask, and sessions that switch layout resume exactly.

Model level (fp32, LoRA with a random B so every LoRA weight has a gradient): the tiny Llama,
Qwen2 with random q/k/v biases, Mistral with a sliding window shorter than a sample, and
SmolLM2 on the demo's chat records. Padded is transformers' own SDPA over right-padded rows
with an attention_mask (what Baton ran before); padding-free is one row through
training/attention.py. Engine level: the tiny Llama through the Trainer (4-bit base, the
reference kernels the CPU gets).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tests.fixtures_tiny import (make_spec, make_trainer, pairs_records, random_samples,
                                 write_jsonl)
from baton.training.attention import use_varlen_attention
from baton.training.encode import IGNORE, Encoded, collate
from baton.training.layout import collate_padding_free, computed_tokens, token_efficiency

LENGTHS = (23, 7, 40, 12)  # row of 82 tokens: no model dimension is 82
VOCAB = 301
COMMON = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128)
CPU = torch.device("cpu")


def _hf_model(arch: str):
    import transformers

    config = {"llama": transformers.LlamaConfig(**COMMON),
              "qwen2": transformers.Qwen2Config(**COMMON),
              "mistral": transformers.MistralConfig(**COMMON, sliding_window=16)}[arch]
    torch.manual_seed(0)
    model = getattr(transformers, type(config).__name__.replace("Config", "ForCausalLM"))(config)
    for name, param in model.named_parameters():
        if name.endswith("bias"):  # Qwen2's q/k/v biases: HF initialises them to zero
            torch.nn.init.normal_(param, std=0.5)
    return _with_lora(model.float())


def _with_lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    # init_lora_weights=False: B random too, so lora_A gets a gradient as well.
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, config)


def _samples(lengths=LENGTHS, seed: int = 3) -> list[Encoded]:
    return random_samples(lengths, seed, VOCAB, masked=3)


def _token_losses(model, batch) -> torch.Tensor:
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    labels = batch["labels"][:, 1:]
    flat = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                           ignore_index=IGNORE, reduction="none")
    return flat.view(labels.shape)


def _per_sample_and_grads(model, batch, samples, padding_free: bool):
    """Each sample's summed token loss, and the LoRA gradients of the mean token loss."""
    model.zero_grad()
    losses = _token_losses(model, batch)
    if padding_free:
        ends = torch.tensor([len(s.input_ids) for s in samples]).cumsum(0).tolist()
        per = [losses[0, a: b - 1].sum() for a, b in zip([0] + ends, ends)]
    else:
        per = [losses[row].sum() for row in range(len(samples))]
    (sum(per) / sum(s.label_tokens for s in samples)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return torch.stack(per).detach(), grads


def assert_layouts_agree(model, samples, pad_id: int) -> None:
    padded = _per_sample_and_grads(model, collate(samples, pad_id), samples, False)
    assert model.get_base_model().config._attn_implementation == "sdpa"
    assert use_varlen_attention(model, CPU, torch.float32) == "sdpa_spans"
    free = _per_sample_and_grads(model, collate_padding_free(samples), samples, True)
    torch.testing.assert_close(free[0], padded[0], atol=1e-5, rtol=1e-5)
    assert len(padded[1]) > 0 and padded[1].keys() == free[1].keys()
    for name, grad in padded[1].items():
        assert grad.abs().sum() > 0, name  # every LoRA weight is in play
        torch.testing.assert_close(free[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_padding_free_equals_padded_losses_and_lora_grads(arch):
    assert_layouts_agree(_hf_model(arch), _samples(), pad_id=0)


def test_padding_free_equals_padded_on_smollm2(real_model_dir):
    """One short real-model check: SmolLM2's weights and ChatML template (GQA 9/3, tied
    embeddings) on three chat records of different lengths. Its first 2 of 30 layers only:
    every layer is the same code, and 30 would cost a CPU minute."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from baton.training.encode import Encoder

    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    encoder = Encoder(tokenizer, "chat", 128)
    samples = [encoder({"messages": [
        {"role": "user", "content": f"Write a Python function that returns {n} squared."},
        {"role": "assistant", "content": "def f():\n" + "    x = 1\n" * n + f"    return {n}**2"},
    ]}) for n in (1, 6, 12)]
    assert len({len(s.input_ids) for s in samples}) == 3  # padding for real
    model = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    assert_layouts_agree(_with_lora(model), samples, tokenizer.pad_token_id)


class _SquareTensors(TorchDispatchMode):
    """Records every op output with two dimensions equal to `n`: a mask or score matrix over
    the whole row would be one."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.found = n, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and list(t.shape).count(self.n) >= 2:
                self.found.append((str(func), tuple(t.shape)))
        return out


def test_no_mask_over_the_row_is_ever_built():
    """Forward and backward of a padding-free row never make an [N, N] tensor (N = the sum of
    the lengths); transformers' own packing path (position_ids, SDPA) does: the check can fail."""
    samples = _samples()
    row = collate_padding_free(samples)
    n = row["input_ids"].shape[1]
    model = _hf_model("llama")
    with _SquareTensors(n) as hf_packing:
        _token_losses(model, row).sum().backward()
    assert hf_packing.found  # the dense block-diagonal mask
    use_varlen_attention(model, CPU, torch.float32)
    with _SquareTensors(n) as ours:
        _token_losses(model, row).sum().backward()
    assert ours.found == []


def test_collate_padding_free_layout():
    samples = _samples((4, 3))
    packed_block = Encoded([1, 2, 3, 4, 5], [IGNORE, 2, 3, IGNORE, 5], [0, 1, 2, 0, 1])
    row = collate_padding_free(samples + [packed_block])
    assert row["input_ids"].shape == (1, 12) and "attention_mask" not in row
    assert row["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 0, 1]
    labels = row["labels"][0].tolist()
    assert labels[4] == IGNORE and labels[7:] == packed_block.labels  # no loss across a seam
    assert computed_tokens(samples, True) == 7 and computed_tokens(samples, False) == 8
    assert token_efficiency([4, 3, 10, 2], 2, padding_free=False) == pytest.approx(19 / 28)
    assert token_efficiency([4, 3, 10, 2], 2, padding_free=True) == 1.0


# -- the engine ---------------------------------------------------------------------------

STEPS, CUT = 8, 4


def _run(spec, data, padding_free: bool, steps: int, *, load=None, save=None):
    """(step, lr, sample indices, loss) of each step of a Trainer in this layout."""
    trainer = make_trainer(spec, data, micro=2, kernels="auto", padding_free=padding_free)
    assert trainer.attention == ("sdpa_spans" if padding_free else "sdpa")
    if load is not None:
        trainer.load(load)
    out = []
    for _ in range(steps):
        r = trainer.train_step()
        out.append((r.step, r.lr, list(trainer.last_indices), r.loss))
        if save is not None and r.step == CUT:
            trainer.save(save)
    return out, trainer.evaluate()


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("padfree")
    data = write_jsonl(tmp / "train.jsonl", pairs_records(24))
    spec = make_spec(tiny_model_dir, data, max_steps=STEPS)
    padded = _run(spec, data, False, STEPS, save=tmp / "padded-4")
    free = _run(spec, data, True, STEPS, save=tmp / "free-4")
    return spec, data, tmp, padded, free


def _assert_same_run(got, want, tol=1e-4):
    assert [g[:3] for g in got] == [w[:3] for w in want]  # step, lr, sample indices
    assert [g[3] for g in got] == pytest.approx([w[3] for w in want], abs=tol)


def test_eight_steps_padded_and_padding_free_end_alike(runs):
    _, _, _, (padded, padded_eval), (free, free_eval) = runs
    _assert_same_run(free, padded)
    assert free_eval == pytest.approx(padded_eval, abs=1e-4)  # eval in the same layout


@pytest.mark.parametrize("first,then", [(False, True), (True, False)])
def test_a_session_may_switch_layout_and_continue_exactly(runs, first, then):
    spec, data, tmp, padded, _ = runs
    checkpoint = tmp / ("free-4" if first else "padded-4")
    continued, _ = _run(spec, data, then, STEPS - CUT, load=checkpoint)
    _assert_same_run(continued, padded[0][CUT:])


# -- config, flag, record -------------------------------------------------------------------

def test_padding_free_is_the_default_a_session_setting_not_the_spec(tmp_path):
    import agent
    from baton.state_schema import DataConfig, DataSpec, SessionRecord

    assert DataConfig(train="t.jsonl").padding_free is True
    assert "padding_free" not in DataSpec.model_fields  # a session may change it
    config = tmp_path / "run.yaml"
    config.write_text("run: r\nstore: /tmp/s\nmodel: {name: m}\ndata: {train: t.jsonl}\n")
    parser = agent.build_parser()
    for flags, want in (([], True), (["--no-padding-free"], False), (["--padding-free"], True)):
        args = parser.parse_args(["run", "--config", str(config), *flags])
        assert agent.load_config(args).data.padding_free is want
    old = SessionRecord.model_validate({"session_id": "s", "host": "h"})
    assert (old.attention, old.padding_free) == ("sdpa", False)  # records from before: padded


def test_token_efficiency_script(tiny_model_dir, tmp_path, capsys):
    from token_efficiency import main

    data = write_jsonl(tmp_path / "train.jsonl", pairs_records(24))
    out = tmp_path / "eff.json"
    assert main(["--model", str(tiny_model_dir), "--data", str(data), "--micro-batch-size",
                 "1", "4", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())["micro_batches"]
    assert figures["1"] == {"padded": 1.0, "padding_free": 1.0}
    assert figures["4"]["padded"] < 1.0 == figures["4"]["padding_free"]
    assert main(["--model", str(tiny_model_dir), "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl" in capsys.readouterr().err
