"""`plan`: parameter counts from the model's config alone, checked against PEFT and a real
adapter file; memory and steps from the stated formulas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from baton.state_schema import RunConfig
from baton.session import plan as planmod

MISTRAL_7B = dict(
    num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
    num_attention_heads=32, num_key_value_heads=8, vocab_size=32768,
)
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _mistral_dir(tmp_path: Path, **shape) -> Path:
    from transformers import MistralConfig

    folder = tmp_path / "mistral-shape"
    MistralConfig(**shape).save_pretrained(folder)
    return folder


def _config(model: Path, data: Path, **train) -> RunConfig:
    return RunConfig.model_validate({
        "run": "plan-test", "store": "unused",
        "model": {"name": str(model)},
        "lora": {"r": 16, "alpha": 32, "target_modules": SEVEN},
        "data": {"train": str(data), "max_seq_len": 2048, "eval": 0.05},
        "train": {"batch_size": 8, "micro_batch_size": 2, **train},
    })


def _jsonl(path: Path, n: int) -> Path:
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"prompt": f"q{i}", "completion": "x" * 400}) + "\n")
    return path


def test_mistral_7b_trainable_params_match_closed_form_and_peft(tmp_path):
    model_dir = _mistral_dir(tmp_path, **MISTRAL_7B)
    config = _config(model_dir, _jsonl(tmp_path / "d.jsonl", 1000))
    H, I, kv = 4096, 14336, 4096 // 32 * 8
    shapes = [(H, H), (H, kv), (H, kv), (H, H), (H, I), (H, I), (I, H)]  # q k v o gate up down
    closed_form = 32 * sum(16 * (i + o) for i, o in shapes)

    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        reference = get_peft_model(
            AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)),
            LoraConfig(r=16, lora_alpha=32, target_modules=SEVEN),
        )
    peft_count, _ = reference.get_nb_trainable_parameters()

    result = planmod.plan(config)
    assert closed_form == 41_943_040
    assert result["trainable_params"] == closed_form == peft_count
    # fp32 tensors plus a small header
    assert 4 * closed_form < result["adapter_bytes"] < 4 * closed_form + 200_000
    # a 7B model in NF4 fits a T4 for micro-batch 2 x 2048 only with room to spare per formula
    assert 4e9 < result["estimated_vram_bytes"] < 15 * planmod.GIB
    assert result["gpus"]["T4-16GB"]["fits"]
    # 1000 samples, 50 held out, 950 / 8 -> 119 steps an epoch, 3 epochs
    assert result["samples"] == 1000 and result["steps_total"] == 357


def test_all_linear_equals_the_seven_projections(tmp_path):
    model_dir = _mistral_dir(tmp_path, **MISTRAL_7B)
    explicit = _config(model_dir, tmp_path / "absent.jsonl")
    all_linear = explicit.model_copy(
        update={"lora": explicit.lora.model_copy(update={"target_modules": "all-linear"})})
    a = planmod.plan(explicit)
    b = planmod.plan(all_linear)
    assert a["trainable_params"] == b["trainable_params"]
    assert a["steps_total"] is None and any("could not count" in n for n in a["notes"])


def test_adapter_bytes_matches_a_saved_adapter(tmp_path):
    """The predicted adapter size is the size PEFT really writes, within a few hundred bytes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    shape = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    model_dir = _mistral_dir(tmp_path, **shape)
    config = _config(model_dir, _jsonl(tmp_path / "d.jsonl", 20))
    result = planmod.plan(config)

    from transformers import AutoConfig

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=SEVEN))
    peft_model.save_pretrained(tmp_path / "adapter")
    real = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert result["trainable_params"] == peft_model.get_nb_trainable_parameters()[0]
    assert abs(result["adapter_bytes"] - real) <= 512, (result["adapter_bytes"], real)


def test_vram_formula_grows_with_micro_batch_and_optimizer(tmp_path):
    model_dir = _mistral_dir(tmp_path, **MISTRAL_7B)
    data = _jsonl(tmp_path / "d.jsonl", 10)
    small = planmod.plan(_config(model_dir, data, micro_batch_size=1, optimizer="adamw_8bit"))
    big = planmod.plan(_config(model_dir, data, micro_batch_size=4, optimizer="adamw"))
    assert big["estimated_vram_bytes"] > small["estimated_vram_bytes"]
    parts = small["vram_breakdown_bytes"]
    # NF4 weights of a 7B model: about 3.7 GiB including 16-bit embeddings and lm_head
    assert 3.3 * planmod.GIB < parts["weights"] < 4.2 * planmod.GIB
    ckpt = big["checkpoint_bytes"]
    assert ckpt["with_optimizer"] - ckpt["without_optimizer"] >= 8 * big["trainable_params"]


def test_max_steps_wins_and_plan_main_prints_json(tmp_path, capsys):
    model_dir = _mistral_dir(tmp_path, num_hidden_layers=2, hidden_size=64,
                             intermediate_size=128, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=256)
    config = _config(model_dir, _jsonl(tmp_path / "d.jsonl", 100), max_steps=42)
    assert planmod.plan_main(config, as_json=True) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps_total"] == 42
    for key in ("trainable_params", "adapter_bytes", "estimated_vram_bytes", "steps_total"):
        assert key in out
    assert out["gpus"]["T4-16GB"]["sessions_guess"] >= 1
    assert planmod.plan_main(config, as_json=False) == 0
    assert "Plan for run plan-test" in capsys.readouterr().out


def test_unreadable_model_exits_2_with_a_message(tmp_path, capsys):
    config = _config(tmp_path / "no-such-model", tmp_path / "d.jsonl")
    assert planmod.plan_main(config, as_json=True) == 2
    assert "model.name" in capsys.readouterr().err


@pytest.mark.parametrize("n,epochs", [(999, 1), (1000, 3), (37, 2.5), (1, 1)])
def test_steps_total_follows_the_engine(tmp_path, n, epochs):
    """The same split and rounding as training.order.split_eval and training.engine."""
    import math

    from baton.training.order import split_eval

    config = _config(tmp_path, _jsonl(tmp_path / "d.jsonl", n), epochs=epochs)
    n_train = len(split_eval(n, 0.05, config.train.seed)[0])
    assert planmod.steps_total(config, n) == max(1, math.ceil(epochs * n_train / 8))


def test_plan_counts_with_the_engines_rules(tmp_path):
    """plan reads data with the engine's reader (a .tsv, which a session refuses, is not
    counted) and counts steps with the engine's own rule and eval split."""
    from types import SimpleNamespace

    from baton.training.engine import total_steps
    from baton.training.order import split_eval

    tsv = tmp_path / "d.tsv"
    tsv.write_text("text\n" + "".join(f"line {i}\n" for i in range(20)))
    assert planmod.count_samples(tsv) == (None, None)
    config = _config(tmp_path, _jsonl(tmp_path / "d.jsonl", 50))
    n_train = len(split_eval(50, 0.05, config.train.seed)[0])
    engine_steps = total_steps(SimpleNamespace(train=config.train), n_train)
    assert planmod.steps_total(config, 50) == engine_steps == 18  # ceil(3 epochs * 47 / 8)


@pytest.mark.parametrize("which", ["tiny_model_dir", "real_model_dir"])
def test_estimate_follows_the_model_as_loaded(which, pairs_file, request):
    """The weight and adapter terms of the estimate against the bytes of the parameters and
    buffers of the model loaded as a session loads it (NF4 base, bf16 compute, LoRA in fp32),
    within 5%: the tiny Llama, and SmolLM2 (tied embeddings, grouped-query attention).
    Measured: 0.3% and 1.4% (the estimate also counts the NF4 absmax, which bitsandbytes keeps
    outside parameters and buffers). Activation terms need a GPU: scripts/gpu_check.py."""
    from tests.fixtures_tiny import make_spec
    from baton.training.devices import detect_device
    from baton.training.model import load_model

    model_dir = request.getfixturevalue(which)
    config = RunConfig.model_validate({
        "run": "p", "store": "unused", "model": {"name": str(model_dir)},
        "lora": {"r": 8, "alpha": 16}, "data": {"train": str(pairs_file), "max_seq_len": 64},
        "train": {"batch_size": 4, "micro_batch_size": 2}})
    cfg = planmod.load_model_config(str(model_dir))
    params = planmod.count_params(planmod.meta_lora_model(cfg, config.lora))
    estimate = planmod.estimate_vram(cfg, params, config)
    model, _ = load_model(make_spec(model_dir, pairs_file, max_steps=1),
                          detect_device("cpu", "bf16"))
    sized = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    lora = sized(p for p in model.parameters() if p.requires_grad)
    base = sized(p for p in model.parameters() if not p.requires_grad) + sized(model.buffers())
    assert lora == params["trainable"] * 4  # fp32 LoRA weights, the estimate's weight bytes
    assert base == pytest.approx(estimate["weights"], rel=0.05)
