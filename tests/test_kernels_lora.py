"""Fused LoRA projections: forward and every gradient against the autograd reference, and a
tiny NF4 Llama / Qwen2 trained through `patch_peft_lora` against PEFT's own path."""

from __future__ import annotations

import os

# Must precede the first import of a Triton kernel module (see test_kernels_nf4.py).
os.environ.setdefault("TRITON_INTERPRET", "1")

import bitsandbytes.functional as bnbf  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from kernels import lora  # noqa: E402
from kernels.lora import (  # noqa: E402
    Projection,
    lora_linear,
    lora_linear_reference,
    lora_mlp,
    lora_mlp_reference,
    lora_qkv,
    lora_qkv_reference,
)

# Max error relative to the largest reference magnitude. fp32 differs only by summation order;
# fp16 and bf16 by where the fused path rounds (it keeps [tokens, r] products and recomputes).
REL_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
DTYPES = list(REL_TOL)
R = 8


def _assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, what
    scale = want.float().abs().max().clamp_min(1e-6)
    err = (got.float() - want.float()).abs().max() / scale
    assert err <= REL_TOL[dtype], f"{what}: relative error {err:.2e} > {REL_TOL[dtype]:.0e}"


def _projection(seed: int, d_in: int, d_out: int, dtype, *, bias=False, nf4=True, nested=True):
    """A LoRA projection with random NF4 (or dense) base, nonzero A and B, fp32 adapters."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=gen) / d_in**0.5
    if nf4:
        weight, state = bnbf.quantize_4bit(
            w.to(dtype), quant_type="nf4", compress_statistics=nested
        )
    else:
        weight, state = w.to(dtype), None
    a = (torch.randn(R, d_in, generator=gen) / d_in**0.5).requires_grad_()
    b = (torch.randn(d_out, R, generator=gen) / R**0.5).requires_grad_()
    b_ias = (torch.randn(d_out, generator=gen) * 0.1).to(dtype).requires_grad_() if bias else None
    return Projection(weight, state, b_ias, a, b, 1.75)


def _twin(p: Projection) -> Projection:
    """Same values, fresh leaves, so the reference's gradients land apart."""
    def leaf(t):
        return None if t is None else t.detach().clone().requires_grad_()

    a, b = leaf(p.lora_A), leaf(p.lora_B)
    return Projection(p.weight, p.quant_state, leaf(p.bias), a, b, p.scaling)


def _x(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype).requires_grad_()


def _backward(outputs, seed=1) -> None:
    """A loss touching every output with its own random weights."""
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in outputs)
    loss.backward()


def _compare(fused_out, ref_out, x, x_ref, projs, refs, dtype) -> None:
    for i, (o, r) in enumerate(zip(fused_out, ref_out)):
        _assert_close(o, r, dtype, f"output {i}")
    _backward(fused_out)
    _backward(ref_out)
    _assert_close(x.grad, x_ref.grad, dtype, "dx")
    for i, (p, q) in enumerate(zip(projs, refs)):
        _assert_close(p.lora_A.grad, q.lora_A.grad, dtype, f"dA[{i}]")
        _assert_close(p.lora_B.grad, q.lora_B.grad, dtype, f"dB[{i}]")
        assert p.lora_A.grad.dtype == torch.float32  # adapters keep their own dtype
        if p.bias is not None:
            _assert_close(p.bias.grad, q.bias.grad, dtype, f"dbias[{i}]")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nf4", [True, False], ids=["nf4", "dense"])
def test_linear_matches_reference(dtype, nf4):
    p = _projection(1, 72, 40, dtype, bias=True, nf4=nf4, nested=False)
    q = _twin(p)
    x, x_ref = _x((3, 5, 72), dtype), _x((3, 5, 72), dtype)
    _compare([lora_linear(x, p)], [lora_linear_reference(x_ref, q)], x, x_ref, [p], [q], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_qkv_matches_reference_with_biases_and_gqa(dtype):
    # Qwen2-style: biases on q, k and v; grouped-query attention: k and v narrower than q.
    projs = [_projection(s, 72, d, dtype, bias=True) for s, d in ((2, 48), (3, 24), (4, 24))]
    refs = [_twin(p) for p in projs]
    x, x_ref = _x((2, 7, 72), dtype), _x((2, 7, 72), dtype)
    _compare(lora_qkv(x, *projs), lora_qkv_reference(x_ref, *refs), x, x_ref, projs, refs, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mlp_matches_reference(dtype):
    # in_features of 64-multiples: bitsandbytes' CPU dequantization, which the reference uses,
    # mis-scales rows that straddle 64-blocks with an even length (see test_kernels_nf4.py).
    projs = [_projection(5, 64, 128, dtype), _projection(6, 64, 128, dtype),
             _projection(7, 128, 64, dtype)]
    refs = [_twin(p) for p in projs]
    x, x_ref = _x((13, 64), dtype), _x((13, 64), dtype)
    out, ref = [lora_mlp(x, *projs)], [lora_mlp_reference(x_ref, *refs)]
    _compare(out, ref, x, x_ref, projs, refs, dtype)


def test_mlp_with_biases_matches_reference():
    projs = [_projection(s, 64, 192, torch.float32, bias=True) for s in (8, 9)]
    projs.append(_projection(10, 192, 64, torch.float32, bias=True))
    refs = [_twin(p) for p in projs]
    x, x_ref = _x((2, 3, 64), torch.float32), _x((2, 3, 64), torch.float32)
    out, ref = [lora_mlp(x, *projs)], [lora_mlp_reference(x_ref, *refs)]
    _compare(out, ref, x, x_ref, projs, refs, torch.float32)


def test_autocast_runs_in_autocast_dtype():
    p = _projection(11, 64, 32, torch.float32)
    q = _twin(p)
    x, x_ref = _x((4, 64), torch.float32), _x((4, 64), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = lora_linear(x, p), lora_linear_reference(x_ref, q)
    assert out.dtype == ref.dtype == torch.bfloat16
    _compare([out], [ref], x, x_ref, [p], [q], torch.bfloat16)
    assert x.grad.dtype == torch.float32


def test_forward_saves_no_dense_weight_and_no_intermediate():
    # The point of the fused MLP: between forward and backward only x and [tokens, r]
    # products are held, never a dequantized weight or a [tokens, intermediate] activation.
    tokens, hidden, inter = 32, 64, 192
    projs = [_projection(12, hidden, inter, torch.float32),
             _projection(13, hidden, inter, torch.float32),
             _projection(14, inter, hidden, torch.float32)]
    saved: list[torch.Size] = []

    def pack(t):
        saved.append(t.shape)
        return t

    x = _x((tokens, hidden), torch.float32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lora_mlp(x, *projs)
    largest = max(s.numel() for s in saved)
    assert largest == tokens * hidden, f"saved tensors {saved}"
    assert not any(tuple(s) in {(inter, hidden), (hidden, inter)} for s in saved)
    y.sum().backward()
    assert all(p.lora_A.grad is not None for p in projs)


# --- a tiny NF4 model through patch_peft_lora ------------------------------------------------

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
        path, dtype=torch.float32, device_map="cpu", **kwargs
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

    patched = lora.patch_peft_lora(model, "triton")
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
    lora.patch_peft_lora(model, "triton")
    _assert_same_training_signal(reference, _loss_and_grads(model, _ids(1)))
    assert calls["LoRAMLPFunction.forward"] == 2 * LAYERS  # once, and once more when recomputed


def test_patched_dense_lora_model_matches_peft(tiny_dirs, calls):
    model = _peft_model(tiny_dirs["llama"], quantized=False)
    reference = _loss_and_grads(model, _ids(2))
    assert len(lora.patch_peft_lora(model, "triton")) == 3 * LAYERS
    _assert_same_training_signal(reference, _loss_and_grads(model, _ids(2)))
    assert calls["LoRAQKVFunction.backward"] == LAYERS


def test_disabled_adapters_fall_back_and_unpatch_restores(tiny_dirs, calls, monkeypatch):
    model = _peft_model(tiny_dirs["llama"])
    ids = _ids(3)
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(input_ids=ids).logits
    names = lora.patch_peft_lora(model, "triton")
    assert lora.patch_peft_lora(model, "triton") == names  # idempotent
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(input_ids=ids).logits, base_logits)
    assert not calls, "with adapters disabled the model's own path must run"
    with torch.no_grad():
        patched_logits = model(input_ids=ids).logits
    assert calls["LoRAQKVFunction.forward"] == LAYERS

    # Where no Triton kernel can run (a CPU tensor without the interpreter) the model's own
    # path runs instead of failing.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    calls.clear()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, patched_logits, rtol=1e-4, atol=1e-5)
    assert not calls
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    assert lora.unpatch_peft_lora(model) == names
    assert all("forward" not in m.__dict__ for m in model.modules())
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, patched_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "lora_kwargs, reason",
    [({"lora_dropout": 0.1}, "dropout"), ({"use_dora": True}, "DoRA")],
    ids=["dropout", "dora"],
)
def test_unfit_layers_are_skipped_and_reported(tiny_dirs, calls, lora_kwargs, reason):
    model = _peft_model(tiny_dirs["llama"], **lora_kwargs)
    skipped: dict[str, str] = {}
    assert lora.patch_peft_lora(model, "triton", skipped=skipped) == []
    assert len(skipped) == LAYERS * 7 and all(reason in why for why in skipped.values())
    model(input_ids=_ids(), labels=_ids()).loss.backward()
    assert not calls


def test_reference_backend_patches_nothing(tiny_dirs):
    model = _peft_model(tiny_dirs["llama"])
    assert lora.patch_peft_lora(model, "reference") == []
    assert all("forward" not in m.__dict__ for m in model.modules())
    with pytest.raises(ValueError, match="backend"):
        lora.patch_peft_lora(model, "cuda")


def test_two_active_adapters_are_skipped(tiny_dirs, calls):
    from peft import LoraConfig

    model = _peft_model(tiny_dirs["llama"])
    model.add_adapter("second", LoraConfig(r=4, target_modules="all-linear"))
    model.base_model.set_adapter(["default", "second"])
    skipped: dict[str, str] = {}
    assert lora.patch_peft_lora(model, "triton", skipped=skipped) == []
    assert len(skipped) == LAYERS * 7
    assert all("one active adapter" in why for why in skipped.values()), skipped
