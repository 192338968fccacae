"""A tiny NF4 (and dense) Llama, Mistral and Qwen2 trained through `patch_peft_lora` against
PEFT's own path: same loss and gradients, the fused functions called as expected, unfit layers
skipped with a reason, and `unpatch_peft_lora` restoring the model."""

from __future__ import annotations

import os

# Must precede the first import of a Triton kernel module (see test_kernels_nf4.py).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from baton.kernels import lora, lora_patch  # noqa: E402
from tests.native_device import DEVICE, skip_on_cuda  # noqa: E402

R = 8  # LoRA rank of the test adapters

LAYERS = 2


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Random tiny Llama, Mistral and Qwen2 checkpoints (Qwen2: biases on q, k, v), saved."""
    from transformers import (
        LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
        Qwen2ForCausalLM,
    )

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                  max_position_embeddings=64)
    dirs = {}
    for name, config, model_cls in (("llama", LlamaConfig, LlamaForCausalLM),
                                    ("mistral", MistralConfig, MistralForCausalLM),
                                    ("qwen2", Qwen2Config, Qwen2ForCausalLM)):
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(name)
        model = model_cls(config(**common))
        with torch.no_grad():  # HF initialises biases to zero, which would test nothing
            for module in model.modules():
                if isinstance(module, torch.nn.Linear) and module.bias is not None:
                    module.bias.normal_(0.0, 0.5)
        model.save_pretrained(path)
        dirs[name] = path
    return dirs


def _peft_model(path, quantized: bool = True, **lora_kwargs):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, device_map=str(DEVICE), **kwargs
    )
    # init_lora_weights=False: B is random too, so every adapter gets a nonzero gradient.
    config = dict(r=R, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                  init_lora_weights=False)
    config.update(lora_kwargs)
    model = get_peft_model(model, LoraConfig(**config))
    # Training mode, as in training: in eval mode bitsandbytes repacks 4-bit weights for its
    # AVX-512 CPU kernel on the first no-grad forward, and the fused path then (rightly) steps
    # aside for those layers.
    return model.train()


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def _ids(seed=0):
    return torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def calls(monkeypatch):
    """Counts forward and backward calls of each fused autograd Function."""
    counts: dict[str, int] = {}

    def counting(key, fn):
        def wrapped(*args, **kwargs):
            counts[key] = counts.get(key, 0) + 1
            return fn(*args, **kwargs)
        return staticmethod(wrapped)

    for cls in (lora.LoRALinearFunction, lora.LoRAQKVFunction, lora.LoRAMLPFunction):
        for method in ("forward", "backward"):
            key = f"{cls.__name__}.{method}"
            monkeypatch.setattr(cls, method, counting(key, getattr(cls, method)))
    return counts


def _assert_same_training_signal(reference, patched, tol=1e-4) -> None:
    (loss_ref, grads_ref), (loss, grads) = reference, patched
    # 1e-5 relative is 84 fp32 ulp: the kernels' exp/rsqrt (a few ulp each on a GPU, exact in
    # the interpreter) summed over the tokens; TF32 is off in GPU runs (tests.native_device).
    assert torch.allclose(loss, loss_ref, rtol=1e-5, atol=0), (loss.item(), loss_ref.item())
    assert grads.keys() == grads_ref.keys() and len(grads) == LAYERS * 7 * 2
    for name, g in grads.items():
        want = grads_ref[name]
        assert want.abs().max() > 0, f"{name}: zero gradient makes the comparison empty"
        err = (g - want).abs().max() / want.abs().max()
        assert err <= tol, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_patched_nf4_model_matches_peft(tiny_dirs, calls, arch):
    model = _peft_model(tiny_dirs[arch])
    reference = _loss_and_grads(model, _ids())
    assert not calls, "the unpatched model must not touch the fused functions"

    patched = lora_patch.patch_peft_lora(model, "triton")
    prefix = "base_model.model.model.layers"
    expected = [f"{prefix}.{i}.{n}" for i in range(LAYERS)
                for n in ("self_attn", "self_attn.o_proj", "mlp")]
    assert patched == expected
    _assert_same_training_signal(reference, _loss_and_grads(model, _ids()))
    for name in ("LoRAQKVFunction", "LoRALinearFunction", "LoRAMLPFunction"):
        assert calls[f"{name}.forward"] == LAYERS and calls[f"{name}.backward"] == LAYERS, calls


def test_patched_model_with_gradient_checkpointing(tiny_dirs, calls):
    model = _peft_model(tiny_dirs["llama"])
    reference = _loss_and_grads(model, _ids(1))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    lora_patch.patch_peft_lora(model, "triton")
    _assert_same_training_signal(reference, _loss_and_grads(model, _ids(1)))
    assert calls["LoRAMLPFunction.forward"] == 2 * LAYERS  # once, and once more when recomputed


def test_patched_dense_lora_model_matches_peft(tiny_dirs, calls):
    model = _peft_model(tiny_dirs["llama"], quantized=False)
    reference = _loss_and_grads(model, _ids(2))
    assert len(lora_patch.patch_peft_lora(model, "triton")) == 3 * LAYERS
    _assert_same_training_signal(reference, _loss_and_grads(model, _ids(2)))
    assert calls["LoRAQKVFunction.backward"] == LAYERS


def test_disabled_adapters_fall_back_and_unpatch_restores(tiny_dirs, calls):
    model = _peft_model(tiny_dirs["llama"])
    ids = _ids(3)
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(input_ids=ids).logits
    names = lora_patch.patch_peft_lora(model, "triton")
    assert lora_patch.patch_peft_lora(model, "triton") == names  # idempotent
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(input_ids=ids).logits, base_logits)
    assert not calls, "with adapters disabled the model's own path must run"
    with torch.no_grad():
        patched_logits = model(input_ids=ids).logits
    assert calls["LoRAQKVFunction.forward"] == LAYERS
    assert lora_patch.unpatch_peft_lora(model) == names
    assert all("forward" not in m.__dict__ for m in model.modules())
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, patched_logits, rtol=1e-4, atol=1e-5)


@skip_on_cuda("a CPU tensor without the interpreter is the case tested")
def test_layers_where_no_kernel_can_run_take_the_model_path(tiny_dirs, calls, monkeypatch):
    # Where no Triton kernel can run (a CPU tensor without the interpreter) the model's own
    # path runs instead of failing.
    model = _peft_model(tiny_dirs["llama"])
    ids = _ids(3)
    lora_patch.patch_peft_lora(model, "triton")
    with torch.no_grad():
        patched_logits = model(input_ids=ids).logits
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    calls.clear()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, patched_logits, rtol=1e-4, atol=1e-5)
    assert not calls


@pytest.mark.parametrize(
    "lora_kwargs, reason",
    [({"lora_dropout": 0.1}, "dropout"), ({"use_dora": True}, "DoRA")],
    ids=["dropout", "dora"],
)
def test_unfit_layers_are_skipped_and_reported(tiny_dirs, calls, lora_kwargs, reason):
    model = _peft_model(tiny_dirs["llama"], **lora_kwargs)
    skipped: dict[str, str] = {}
    assert lora_patch.patch_peft_lora(model, "triton", skipped=skipped) == []
    assert len(skipped) == LAYERS * 7 and all(reason in why for why in skipped.values())
    model(input_ids=_ids(), labels=_ids()).loss.backward()
    assert not calls


def test_reference_backend_patches_nothing(tiny_dirs):
    model = _peft_model(tiny_dirs["llama"])
    assert lora_patch.patch_peft_lora(model, "reference") == []
    assert all("forward" not in m.__dict__ for m in model.modules())
    with pytest.raises(ValueError, match="backend"):
        lora_patch.patch_peft_lora(model, "cuda")


def test_two_active_adapters_are_skipped(tiny_dirs, calls):
    from peft import LoraConfig

    model = _peft_model(tiny_dirs["llama"])
    model.add_adapter("second", LoraConfig(r=4, target_modules="all-linear"))
    model.base_model.set_adapter(["default", "second"])
    skipped: dict[str, str] = {}
    assert lora_patch.patch_peft_lora(model, "triton", skipped=skipped) == []
    assert len(skipped) == LAYERS * 7
    assert all("one active adapter" in why for why in skipped.values()), skipped
