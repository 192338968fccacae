"""An adapter saved by Baton is a plain PEFT adapter: PeftModel.from_pretrained loads it."""

from __future__ import annotations

import json

import torch

from tests.fixtures_tiny import make_spec, make_trainer


def test_saved_adapter_loads_in_plain_peft_with_same_logits(
        tmp_path, tiny_model_dir, pairs_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    spec = make_spec(tiny_model_dir, pairs_file, max_steps=3)
    t = make_trainer(spec, pairs_file)
    for _ in range(3):
        t.train_step()
    t.save(tmp_path / "ck")
    assert json.loads((tmp_path / "ck" / "adapter_config.json").read_text())["r"] == 8

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quant,
                                                device_map={"": "cpu"})
    plain = PeftModel.from_pretrained(base, tmp_path / "ck").train()  # train(): same NF4 path
    for module in plain.modules():  # no dropout in either model, without repacking weights
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    batch = t.tokenizer(["def f(x):\n    return x + 1\n"], return_tensors="pt")
    t.model.eval()
    with torch.no_grad():
        ours = t.model(**batch).logits
        theirs = plain(**batch).logits
    # Same NF4 weights, same fp32 LoRA weights, same kernels: equal up to float rounding.
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    # And the adapter is not a no-op: the trained LoRA moved the logits off the base model's.
    with torch.no_grad(), plain.disable_adapter():
        untouched = plain(**batch).logits
    assert (untouched - ours).abs().max() > 1e-2
    # Plain eval() as a user would run it: on AVX512-BF16 CPUs bitsandbytes repacks NF4 for a
    # bf16 inference kernel (measured max |diff| 0.002 on logits of magnitude 0.6).
    with torch.no_grad():
        inference = plain.eval()(**batch).logits
    torch.testing.assert_close(inference, ours, rtol=0, atol=1e-2)
