"""The new kernel ops of the family table against the HF modules they replace, forward and
every gradient, in Triton's interpreter on the CPU (fp32; tolerances 1e-5 unless stated):

- RMSNorm with Gemma's (1 + w) and OLMo 2's fp32-then-cast, and as QK-norm on Gemma 3's
  transposed [B, H, L, D] heads;
- GeGLU (gelu_pytorch_tanh) against Gemma 2's MLP activation;
- RoPE with partial rotary (Phi-3's apply_rotary_pos_emb) and GPT-OSS's half-width cos/sin;
- per-sample eager attention against the family's eager attention over a dense
  block-diagonal mask: Gemma 2's softcap and sliding window, GPT-OSS's sinks (their gradient
  too).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported by the kernel modules

import pytest
import torch

from baton.kernels.architectures import ARCHITECTURES
from baton.kernels.geglu import geglu, geglu_reference
from baton.kernels.patch_ops import norm_forward, rope_function
from baton.kernels.varlen_attention import segments_of
from baton.kernels.varlen_eager import eager_spans, eager_spans_reference, family_eager
from tests.fixtures_families import family_config

TOL = dict(atol=1e-5, rtol=1e-5)


def _grads(fn, *inputs):
    """fn's output and the gradient of <output, fixed random weights> for every input."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    (out * weights).sum().backward()
    return out.detach(), [t.grad for t in inputs]


def _assert_same(got, want) -> None:
    torch.testing.assert_close(got[0], want[0], **TOL)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, **TOL)


@pytest.mark.parametrize("family,norm_class,shape", [
    ("gemma2", "Gemma2RMSNorm", (2, 7, 64)),
    ("olmo2", "Olmo2RMSNorm", (2, 7, 64)),
    ("gemma3_text", "Gemma3RMSNorm", "qk"),  # QK-norm on the attention's transposed heads
])
def test_rmsnorm_variants_match_the_hf_module(family, norm_class, shape):
    import importlib

    arch = ARCHITECTURES[family]
    cls = getattr(importlib.import_module(arch.modeling_module), norm_class)
    width = 16 if shape == "qk" else 64
    module = cls(width, eps=1e-6)
    torch.nn.init.normal_(module.weight, std=0.5)
    x = torch.randn(2, 7, 4, width) * 3
    x = x.transpose(1, 2) if shape == "qk" else torch.randn(*shape) * 3  # strided, as HF's
    patched = norm_forward(arch)

    def hf(x, w):
        module.weight = torch.nn.Parameter(w)
        return type(module).forward(module, x)

    def ours(x, w):
        module.weight = torch.nn.Parameter(w)
        return patched(module, x)

    _assert_same(_grads(ours, x, module.weight.data), _grads(hf, x, module.weight.data))


def test_geglu_matches_gemma_activation():
    from transformers.activations import ACT2FN

    act = ACT2FN[family_config("gemma2").hidden_activation]
    gate, up = torch.randn(3, 5, 128) * 3, torch.randn(3, 5, 128)
    _assert_same(_grads(geglu, gate, up), _grads(lambda g, u: act(g) * u, gate, up))
    torch.testing.assert_close(geglu(gate, up), geglu_reference(gate, up), **TOL)


def _cos_sin(width: int, seq: int = 9):
    angles = torch.arange(seq)[:, None] * torch.rand(width // 2)[None]
    emb = torch.cat([angles, angles], dim=-1)[None] * 1.3  # scaled, as yarn's factor does
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("family,rotary", [("phi3", 8), ("gpt_oss", 8)])
def test_rope_partial_and_split_match_hf(family, rotary):
    import importlib

    arch = ARCHITECTURES[family]
    hf = importlib.import_module(arch.modeling_module).apply_rotary_pos_emb
    ours = rope_function(arch, hf)
    q, k = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 9, 16)
    cos, sin = _cos_sin(rotary if family == "phi3" else 16)
    if family == "gpt_oss":  # GPT-OSS's cos/sin hold one half of the head
        cos, sin = cos[..., :8], sin[..., :8]
    both = lambda fn: lambda a, b: torch.cat([t.flatten() for t in fn(a, b, cos, sin)])  # noqa
    _assert_same(_grads(both(ours), q, k), _grads(both(hf), q, k))


def _attention_module(family: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(family), dtype=torch.float32)
    attn = model.model.layers[0].self_attn
    if family == "gpt_oss":
        torch.nn.init.normal_(attn.sinks, std=1.0)
    return attn


@pytest.mark.parametrize("family", ["gemma2", "gpt_oss"])
def test_eager_spans_keep_softcap_sinks_and_window(family):
    attn = _attention_module(family)
    assert attn.sliding_window  # layer 0 of the alternation is a sliding one
    positions = torch.tensor([list(range(13)) + list(range(6)) + list(range(11))])
    segments = segments_of(positions, 1)
    q, k, v = torch.randn(1, 4, 30, 16) * 2, torch.randn(1, 2, 30, 16) * 2, torch.randn(1, 2, 30, 16)
    kwargs = dict(scaling=attn.scaling, dropout=0.0)
    if family == "gemma2":
        kwargs["softcap"] = attn.attn_logit_softcapping
    spans = lambda a, b, c: eager_spans(attn, a, b, c, segments,  # noqa: E731
                                        window=attn.sliding_window, **kwargs)
    dense = lambda a, b, c: eager_spans_reference(attn, a, b, c, segments,  # noqa: E731
                                                  window=attn.sliding_window, **kwargs)
    _assert_same(_grads(spans, q, k, v), _grads(dense, q, k, v))
    unwindowed = eager_spans(attn, q, k, v, segments, **kwargs)
    assert not torch.allclose(unwindowed, spans(q, k, v), atol=1e-3)  # the window matters
    assert family_eager(attn).__module__ == type(attn).__module__
    if family == "gpt_oss":  # the sinks are a parameter: their gradient too
        grads = []
        for fn in (spans, dense):
            attn.sinks.grad = None
            fn(q, k, v).sum().backward()
            grads.append(attn.sinks.grad.clone())
        torch.testing.assert_close(grads[0], grads[1], **TOL)
