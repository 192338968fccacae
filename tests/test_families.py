"""Every family of the kernel table on every path, against plain HF + PEFT on padded rows.

The matrix: families x {reference kernels, Triton in the interpreter} x {padding-free, padded}.
Each model is one of tests/fixtures_families.py's tiny, sharply initialised configs (a wrong
mask, a dropped softcap or sink, a lost window moves the loss), built once per session and
copied per path. The reference is transformers' own modules with PEFT's LoRA on padded rows
(`BATON_KERNELS=none --no-padding-free`, what a user gets without Baton). Each path runs a few
AdamW steps on the LoRA weights, fp32:
- every step's loss within 1e-4 of the reference's;
- the LoRA gradients of the first micro-batch within 1e-5 (relative to the largest).
The Triton column runs one step (the interpreter is slow: its loss and its gradients); that
its kernels ran, the report shows.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.fixtures_families import FAMILIES, VOCAB, WINDOW, tiny_family_model
from tests.fixtures_tiny import random_samples
from baton.kernels.patch import patch_model, restore_rope
from baton.training.encode import collate
from baton.training.layout import collate_padding_free

LENGTHS = ((13, 6, 17), (9, 15, 5), (11, 4, 12))  # one micro-batch a step; windows of 8 matter
LORA_TOL, LOSS_TOL = 1e-5, 1e-4
PATHS = [("reference", True), ("reference", False), ("triton", True), ("triton", False)]


STEPS = [random_samples(lengths, seed, VOCAB, low=3, masked=2)
         for seed, lengths in enumerate(LENGTHS)]


def _with_lora(model):
    """PEFT's LoRA on what a session targets (training/model.py's lora_config: the experts'
    weights of a mixture of experts too, never its router)."""
    from peft import get_peft_model

    from baton.state_schema import LoraConfig
    from baton.training.model import lora_config

    torch.manual_seed(1)
    config = lora_config(LoraConfig(r=4, alpha=8, dropout=0.0), model=model)
    config.init_lora_weights = False  # B random too, so lora_A gets a gradient as well
    return get_peft_model(model, config)


@pytest.fixture(scope="session")
def family_models():
    """Each family's tiny base model, built and sharpened once; tests take deep copies."""
    return {family: tiny_family_model(family) for family in FAMILIES}


def _batch(samples, padding_free: bool) -> dict:
    return collate_padding_free(samples) if padding_free else collate(samples, 0)


def _train(model, padding_free: bool, steps: int):
    """(per-step losses, LoRA gradients of the first micro-batch)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses, first = [], None
    for samples in STEPS[:steps]:
        opt.zero_grad()
        n_items = torch.tensor(float(sum(s.label_tokens for s in samples)))
        out = model(**_batch(samples, padding_free), num_items_in_batch=n_items)
        out.loss.backward()
        if first is None:
            first = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        losses.append(out.loss.item())
        opt.step()
    return losses, first


@pytest.fixture(scope="session")
def plain_runs(family_models):
    """Plain HF + PEFT on padded rows, the family's own attention: the reference runs."""
    return {f: _train(_with_lora(copy.deepcopy(m)), False, len(STEPS))
            for f, m in family_models.items()}


def _baton_model(base, kernels: str, padding_free: bool, monkeypatch):
    from baton.training.eager_attention import use_per_sample_attention

    monkeypatch.setenv("BATON_KERNELS", kernels)
    model = _with_lora(copy.deepcopy(base))
    report = patch_model(model, "cpu")
    attention = None
    if padding_free:
        attention = use_per_sample_attention(model, torch.device("cpu"), torch.float32)
    return model, report, attention


def _assert_grads_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and want
    for name, g in want.items():
        scale = g.abs().max()
        assert scale > 0, f"{name}: a zero gradient makes the comparison empty"
        err = (got[name] - g).abs().max() / max(1.0, scale)
        assert err <= LORA_TOL, f"{name}: error {err:.2e} (largest gradient {scale:.2e})"


@pytest.mark.parametrize("kernels,padding_free", PATHS,
                         ids=[f"{k}-{'free' if f else 'padded'}" for k, f in PATHS])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_path_matches_plain_hf(family, kernels, padding_free, family_models,
                                      plain_runs, monkeypatch):
    model, report, attention = _baton_model(family_models[family], kernels, padding_free,
                                            monkeypatch)
    try:
        steps = len(STEPS) if kernels == "reference" else 1
        losses, grads = _train(model, padding_free, steps)
    finally:
        restore_rope()
    want_losses, want_grads = plain_runs[family]
    assert losses == pytest.approx(want_losses[:steps], abs=LOSS_TOL)
    _assert_grads_close(grads, want_grads)
    assert report.architecture == family
    if padding_free:
        lm = model.get_base_model()
        assert attention == ("eager_spans" if not lm._supports_sdpa else "sdpa_spans")
    if kernels == "triton":
        assert {"rmsnorm", "fused_lora"} <= set(report.patched), report


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_moe_trains_attention_and_experts_never_the_router(family, family_models):
    model = _with_lora(copy.deepcopy(family_models[family]))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    layer = [n.split("layers.0.", 1)[1] for n in trained if "layers.0." in n]
    assert any(n.startswith("self_attn.q_proj.lora_A") for n in layer)
    assert any(n.startswith("mlp.experts.") and "lora_A" in n for n in layer), layer
    assert not [n for n in layer if "router" in n or n.startswith("mlp.gate")], layer
    assert all("lora_" in n for n in trained)  # the base, experts and router stay frozen


@pytest.mark.parametrize("family", ["qwen3_moe", "gemma2"])
def test_plan_counts_what_a_session_trains_with_the_family_layout(family, family_models):
    """`plan` builds the model on the meta device with the session's LoRA targets: its
    trainable count is the session's; its memory uses the family's MLP width (top-k experts)
    and one chunk of logits (the fused loss takes Gemma 2's softcap)."""
    from baton.session.family_plan import fused_loss, mlp_width
    from baton.session.plan import count_params, estimate_vram, meta_lora_model
    from baton.state_schema import LoraConfig, RunConfig
    from tests.fixtures_families import family_config

    lora = LoraConfig(r=4, alpha=8, dropout=0.0)
    planned = count_params(meta_lora_model(family_config(family), lora))
    trained = sum(p.numel() for p in _with_lora(copy.deepcopy(family_models[family])).parameters()
                  if p.requires_grad)
    assert planned["trainable"] == trained
    cfg = family_config(family)
    top_k = getattr(cfg, "num_experts_per_tok", None)
    expert = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    assert mlp_width(cfg, 64) == (expert * top_k if top_k else cfg.intermediate_size)
    config = RunConfig.model_validate({"run": "r", "store": "/tmp/s", "model": {"name": "m"},
                                       "data": {"train": "t.jsonl", "max_seq_len": 4096},
                                       "train": {"micro_batch_size": 1}})
    logits = estimate_vram(cfg, planned, config)["logits"]
    rows = 2048 if fused_loss(cfg) else 4096
    assert logits == rows * cfg.vocab_size * 8
    assert fused_loss(cfg)  # Gemma 2's final-logit softcap included


@pytest.mark.parametrize("model_type,unfused_loss", [("starcoder2", False), ("cohere", True)])
def test_an_architecture_outside_the_table_gets_the_family_free_ops(model_type, unfused_loss,
                                                                    monkeypatch):
    """Starcoder2 and Cohere are not in the table: on the Triton path they still get the
    fused LoRA projections, and the chunked loss where the forward passes lm_head's output
    straight to it (Starcoder2; Cohere scales its logits, so HF's loss stays, named); the
    report names what stays unfused; the training signal is plain HF + PEFT's."""
    import transformers

    config = transformers.AutoConfig.for_model(
        model_type, vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    from tests.fixtures_families import sharpen

    sharpen(base)
    want = _train(_with_lora(copy.deepcopy(base)), False, 1)
    model, report, _ = _baton_model(base, "triton", False, monkeypatch)
    try:
        got = _train(model, False, 1)
    finally:
        restore_rope()
    assert got[0] == pytest.approx(want[0], abs=LOSS_TOL)
    _assert_grads_close(got[1], want[1])
    assert report.architecture == "" and "fused_lora" in report.patched
    assert f"model_type {model_type!r} is not in the table" in report.unfused_text()
    fused = "fused_linear_cross_entropy" in report.patched
    assert fused is not unfused_loss
    if unfused_loss:
        assert "changes the logits" in report.unfused["fused_linear_cross_entropy"]


def test_moe_targets_follow_the_spec_and_never_the_router(family_models):
    from baton.training.model import moe_targets

    model = family_models["qwen3_moe"]
    assert moe_targets(model, "all-linear") == (["k_proj", "o_proj", "q_proj", "v_proj"],
                                                ["down_proj", "gate_up_proj"])
    assert moe_targets(model, ["q_proj", "v_proj"]) == (["q_proj", "v_proj"], [])
    assert moe_targets(model, ["q_proj", "experts", "gate"]) == (
        ["q_proj"], ["down_proj", "gate_up_proj"])
    assert moe_targets(family_models["llama"], "all-linear") is None  # dense: PEFT's own
