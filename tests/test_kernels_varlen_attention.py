"""kernels/varlen_attention.py: per-sample causal attention against its dense reference.

The reference is the definition (softmax under a block-diagonal causal mask over the whole
flattened batch); SDPA per span must match it in the output and in every gradient (query, key,
value), fp32 to 1e-5, with GQA, several rows, and a sliding window shorter than a sample.
FlashAttention's varlen kernel needs a CUDA GPU of sm_80+ with flash_attn installed: here only
its choice rule is checked.
"""

from __future__ import annotations

import pytest
import torch

from baton.kernels.varlen_attention import (
    FLASH_VARLEN, SDPA_SPANS, sdpa_spans, segments_of, varlen_attention_reference,
    varlen_path_for, window_mask,
)

TOL = dict(atol=1e-5, rtol=1e-5)


def _positions(rows: list[list[int]]) -> torch.Tensor:
    """position_ids of rows made of samples of these lengths (rows of equal width)."""
    return torch.tensor([[p for n in row for p in range(n)] for row in rows])


def _qkv(batch: int, length: int, heads: int = 4, kv_heads: int = 2, dim: int = 16, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(batch, h, length, dim, generator=g,  # noqa: E731
                                 dtype=torch.float64).float().requires_grad_()
    return make(heads), make(kv_heads), make(kv_heads)


def _grads(fn, q, k, v, segments, **kw):
    out = fn(q, k, v, segments, **kw)
    g = torch.Generator().manual_seed(9)
    (out * torch.randn(out.shape, generator=g).to(out.device, out.dtype)).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    return out.detach(), grads


def test_segments_restart_at_each_position_zero_and_each_row():
    pos = _positions([[3, 5], [8]])
    seg = segments_of(pos, batch=2)
    assert seg.spans == ((0, 3), (3, 8), (8, 16)) and seg.max_len == 8
    assert seg.cu_seqlens.tolist() == [0, 3, 8, 16] and seg.cu_seqlens.dtype == torch.int32
    # HF's default positions are one row for a whole padded batch: each row is one sample.
    assert segments_of(torch.arange(6)[None], batch=3).spans == ((0, 6), (6, 12), (12, 18))


@pytest.mark.parametrize("rows,window", [
    ([[7, 1, 12, 5]], None),          # padding-free: one row of four samples, one of length 1
    ([[9, 6], [4, 4, 7]], None),      # packed blocks, two rows
    ([[20, 3, 11]], 6),               # Mistral's sliding window, shorter than two samples
])
def test_sdpa_spans_matches_reference_forward_and_every_gradient(rows, window):
    pos = _positions(rows)
    q, k, v = _qkv(pos.shape[0], pos.shape[1])
    seg = segments_of(pos, pos.shape[0])
    got, got_grads = _grads(sdpa_spans, q, k, v, seg, scale=0.3, window=window)
    want, want_grads = _grads(varlen_attention_reference, q, k, v, seg, scale=0.3,
                              window=window)
    assert got.shape == (pos.shape[0], pos.shape[1], 4, 16)  # HF's [B, L, H, D]
    torch.testing.assert_close(got, want, **TOL)
    for name, a, b in zip("qkv", got_grads, want_grads):
        torch.testing.assert_close(a, b, **TOL, msg=f"d{name}")


def test_samples_do_not_see_each_other():
    """Changing one sample's keys moves only that sample's output: the check can fail."""
    pos = _positions([[5, 6]])
    q, k, v = _qkv(1, 11)
    seg = segments_of(pos, 1)
    before = sdpa_spans(q, k, v, seg).detach()
    k2 = k.detach().clone()
    k2[:, :, :5] += torch.randn(k2[:, :, :5].shape)  # not a constant: softmax ignores one
    after = sdpa_spans(q, k2, v, seg).detach()
    assert torch.equal(before[:, 5:], after[:, 5:])
    assert not torch.allclose(before[:, :5], after[:, :5])


def test_window_mask_is_hf_sliding_window():
    m = window_mask(5, 2, "cpu")
    assert m.tolist()[4] == [False, False, False, True, True]
    assert m.tolist()[0] == [True, False, False, False, False]


@pytest.mark.parametrize("device,cap,flash,dtype,want", [
    ("cuda", (8, 0), True, torch.bfloat16, FLASH_VARLEN),
    ("cuda", (9, 0), True, torch.float16, FLASH_VARLEN),
    ("cuda", (7, 5), True, torch.float16, SDPA_SPANS),    # T4: no FlashAttention-2
    ("cuda", (8, 6), False, torch.bfloat16, SDPA_SPANS),  # flash_attn not installed
    ("cuda", (8, 0), True, torch.float32, SDPA_SPANS),    # flash runs 16-bit only
    ("cpu", None, True, torch.float32, SDPA_SPANS),
])
def test_path_choice(device, cap, flash, dtype, want):
    assert varlen_path_for(device, cap, flash, dtype) == want


def _gpu_paths() -> list:
    from baton.kernels.varlen_attention import flash_available

    if not torch.cuda.is_available():
        return [pytest.param(None, marks=pytest.mark.skip(reason="needs a CUDA GPU"))]
    paths = [SDPA_SPANS]
    if flash_available() and torch.cuda.get_device_capability() >= (8, 0):
        paths.append(FLASH_VARLEN)
    return paths


@pytest.mark.parametrize("path", _gpu_paths())
def test_gpu_paths_in_fp16_match_reference(path):
    """On a GPU (scripts/gpu_check.py): each path this GPU has, in fp16, against the fp32
    reference; 16-bit tolerances (2e-3 on outputs of unit scale)."""
    from baton.kernels.varlen_attention import VARLEN_FUNCTIONS

    pos = _positions([[37, 5, 90, 16]]).cuda()
    q, k, v = (t.detach().cuda().half().requires_grad_() for t in _qkv(1, 148))
    seg = segments_of(pos, 1)
    got, got_grads = _grads(VARLEN_FUNCTIONS[path], q, k, v, seg, scale=0.25, window=32)
    ref = [t.detach().float().requires_grad_() for t in (q, k, v)]
    want, want_grads = _grads(varlen_attention_reference, *ref, seg, scale=0.25, window=32)
    torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=2e-3)
    for name, a, b in zip("qkv", got_grads, want_grads):
        torch.testing.assert_close(a.float(), b, atol=5e-3, rtol=5e-3, msg=f"d{name}")
