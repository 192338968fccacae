"""Gemma 2 and GPT-OSS through a whole session (`agent.py run`, in this process): both used to
exit 1 on every Baton path (padding-free loaded them with SDPA, which they refuse). Now the
default path (reference kernels on the CPU, padding-free) trains them with their own eager
attention per sample, names it ("eager_spans") in the start line, the session record and
`status`, names the ops their family keeps unfused, and its per-step losses equal plain HF +
PEFT on padded rows (`BATON_KERNELS=none --no-padding-free`) within 1e-4.
"""

from __future__ import annotations

import pytest

from tests.agent_helpers import open_run, write_config, write_data
from tests.fixtures_families import save_family_model
from tests.inprocess import run_session_here


def _session(tmp_path, model_dir, name: str, monkeypatch, kernels: str, *flags: str):
    monkeypatch.setenv("BATON_KERNELS", kernels)
    store = str(tmp_path / f"store-{name}")
    config = write_config(tmp_path, model_dir=model_dir, store=store, run="t",
                          train_file=write_data(tmp_path / "d.jsonl"),
                          train={"max_steps": 3, "precision": "fp32"})
    code = run_session_here(config, tmp_path / f"work-{name}", *flags)
    (record,) = open_run(store).read_sessions()
    return code, record, store


@pytest.mark.parametrize("family,overrides,unfused", [
    ("gemma2", {}, None),  # its final-logit softcap goes to the fused loss
    # The router's auxiliary loss is HF's to add: the loss stays HF's, and says so.
    ("gpt_oss", {"output_router_logits": True},
     "fused_linear_cross_entropy (the router's auxiliary loss joins HF's)"),
])
def test_softcap_and_sink_families_train_padding_free_like_plain_hf(
        family, overrides, unfused, tmp_path, tiny_model_dir, monkeypatch, capsys):
    from rich.console import Console

    from baton.handoff import open_store
    from baton.session.status import collect_status, render

    model_dir = save_family_model(family, tmp_path / family, tiny_model_dir, **overrides)
    code, plain, _ = _session(tmp_path, model_dir, "plain", monkeypatch, "none",
                              "--no-padding-free")
    assert code == 0 and plain.attention == "eager" and not plain.padding_free
    capsys.readouterr()
    code, baton, store = _session(tmp_path, model_dir, "baton", monkeypatch, "auto")
    out = capsys.readouterr().out
    assert code == 0, out
    assert "(fp32, kernels reference, attention eager_spans" in out
    assert (baton.attention, baton.padding_free, baton.end_step) == ("eager_spans", True, 3)
    assert [s for s, _ in baton.losses] == [s for s, _ in plain.losses] == [1, 2, 3]
    assert [v for _, v in baton.losses] == pytest.approx([v for _, v in plain.losses], abs=1e-4)
    console = Console(record=True, width=300)
    render(collect_status(open_store(store), "t"), console)
    status = console.export_text()
    assert "eager_spans" in status  # status names the attention path
    if unfused:
        assert f"unfused: {unfused}" in out and baton.kernels_unfused.startswith(unfused)
        assert f"unfused: {unfused}" in status
    else:
        assert baton.kernels_unfused is None


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "phi3"])
def test_merge_verifies_each_family_logits(family, tmp_path, tiny_model_dir):
    """scripts/merge.py's merge, save and reload with plain transformers, on families whose
    LoRA is not only Linear layers (experts through target_parameters, in Qwen3-MoE's
    [experts, out, in] and GPT-OSS's [experts, in, out] layouts) or on merged projections
    (Phi-3's qkv_proj and gate_up_proj): the reloaded merged model's logits equal base +
    adapter."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from baton.scripts.merge import merge_and_save, verify_saved
    from baton.state_schema import LoraConfig
    from baton.training.model import lora_config

    base = AutoModelForCausalLM.from_pretrained(
        save_family_model(family, tmp_path / "base", tiny_model_dir), dtype=torch.float32)
    config = lora_config(LoraConfig(r=4, alpha=8), model=base)
    config.init_lora_weights = False  # a B that moves the logits
    model = get_peft_model(base, config)
    reference = merge_and_save(model, AutoTokenizer.from_pretrained(tiny_model_dir),
                               tmp_path / "merged", "1GB")
    ok, message = verify_saved(tmp_path / "merged", "float32", reference, None)
    assert ok, message


@pytest.mark.parametrize("family", ["qwen3_moe"])
def test_classification_trains_families_with_a_classifier_class(family, tmp_path,
                                                                tiny_model_dir):
    """A sequence classifier of Qwen3-MoE (experts' LoRA, router frozen, the head in full):
    Baton's path (reference kernels) trains the same two steps as the plain HF + PEFT
    modules."""
    from tests.fixtures_classify import classification_spec, colour_records
    from tests.fixtures_tiny import make_trainer, write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl", colour_records(16))
    model_dir = save_family_model(family, tmp_path / family, tiny_model_dir)
    spec = classification_spec(model_dir, data, max_steps=2, batch_size=4, eval_=0.25)
    runs = []
    for kernels in ("none", "auto"):
        trainer = make_trainer(spec, data, micro=4, kernels=kernels)
        runs.append([trainer.train_step().loss for _ in range(2)])
    assert runs[1] == pytest.approx(runs[0], abs=1e-5)
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trained)
    assert not [n for n in trained if ".mlp.gate." in n or "router" in n]


def test_classification_on_a_family_without_a_classifier_class_is_refused(tmp_path,
                                                                         tiny_model_dir):
    from tests.fixtures_classify import classification_spec, colour_records
    from tests.fixtures_tiny import make_trainer, write_jsonl

    from baton.training.model import ClassifierFamilyError

    data = write_jsonl(tmp_path / "train.jsonl", colour_records(8))
    model_dir = save_family_model("granite", tmp_path / "granite", tiny_model_dir)
    spec = classification_spec(model_dir, data, max_steps=1, batch_size=4, eval_=0.25)
    with pytest.raises(ClassifierFamilyError, match="no sequence-classification class"):
        make_trainer(spec, data, micro=4)
