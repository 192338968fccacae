"""kernels/varlen_attention.py: per-sample causal attention against its dense reference.

The reference is the definition (softmax under a block-diagonal causal mask over the whole
flattened batch); SDPA over length buckets must match it in the output and in every gradient
(query, key, value), fp32 to 1e-5, with GQA, several rows, one bucket and several, and a sliding
window shorter than a sample. The GPU paths (flash_attn's and torch's varlen kernels, the
memory-efficient one) need CUDA: here their choice rule, and flash_attn's and torch's calls
through stand-in modules that compute the reference (their dtype guard and argument layout);
on a GPU, `test_gpu_paths_in_fp16_match_reference` runs each path the GPU has.
"""

from __future__ import annotations

import pytest
import torch

from baton.kernels.varlen_attention import (
    BUCKET_WASTE, EFFICIENT_VARLEN, FLASH_VARLEN, SDPA_SPANS, TORCH_VARLEN, group_spans,
    sdpa_spans, segments_of, varlen_attention_reference, varlen_path_for, window_mask,
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
    ([[6, 6, 6], [9, 9]], None),      # equal lengths: one bucket, no padding
    ([[40, 2, 3, 17]], 9),            # three buckets, the window in some of them only
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
    ("cuda", (8, 6), False, torch.bfloat16, TORCH_VARLEN),  # no flash_attn: torch's own
    ("cuda", (8, 9), False, torch.float16, TORCH_VARLEN),
    ("cuda", (7, 5), True, torch.float16, EFFICIENT_VARLEN),  # T4: no FlashAttention-2
    ("cuda", (8, 0), True, torch.float32, EFFICIENT_VARLEN),  # flash runs 16-bit only
    ("cpu", None, True, torch.float32, SDPA_SPANS),
])
def test_path_choice(device, cap, flash, dtype, want):
    assert varlen_path_for(device, cap, flash, dtype) == want


def test_path_choice_without_torch_varlen():
    assert varlen_path_for("cuda", (8, 0), False, torch.bfloat16,
                           has_torch_varlen=False) == EFFICIENT_VARLEN


@pytest.mark.parametrize("lengths,buckets", [
    ([5, 5, 5, 5], [[0, 1, 2, 3]]),            # equal lengths: one call, nothing padded
    ([100, 90, 80, 10, 12], [[0, 1, 2, 4], [3]]),  # the 10 would pass 2x: its own call
    ([7], [[0]]),
])
def test_spans_are_grouped_within_the_waste_bound(lengths, buckets):
    got = group_spans(lengths)
    assert got == buckets
    for members in got:
        longest = max(lengths[i] for i in members)
        assert len(members) * longest**2 <= BUCKET_WASTE * sum(lengths[i] ** 2 for i in members)


def _reference_flash(dtypes_seen):
    """A stand-in `flash_attn` module: FlashAttention's contract (16-bit q, k, v of one dtype,
    [tokens, heads, dim], cu_seqlens), computed by the reference."""
    import types

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                               max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False,
                               window_size=(-1, -1)):
        dtypes_seen.append((q.dtype, k.dtype, v.dtype))
        if not (q.dtype == k.dtype == v.dtype and q.dtype in (torch.float16, torch.bfloat16)):
            raise RuntimeError("FlashAttention only support fp16 and bf16 data type")
        assert causal and torch.equal(cu_seqlens_q, cu_seqlens_k)
        cu = cu_seqlens_q.tolist()
        seg = segments_of(torch.cat([torch.arange(b - a) for a, b in zip(cu, cu[1:])])[None], 1)
        window = None if window_size[0] < 0 else window_size[0] + 1
        out = varlen_attention_reference(*(t.float().transpose(0, 1)[None] for t in (q, k, v)),
                                         seg, scale=softmax_scale, window=window)
        return out[0].to(q.dtype)

    return types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func)


def test_flash_gets_16_bit_tensors_when_rope_left_q_and_k_in_fp32(monkeypatch):
    # fp16 forced on sm_80+ with HF's RoPE: q and k come out fp32 (cos/sin are fp32), v fp16.
    import sys

    from baton.kernels.varlen_attention import flash_varlen

    seen = []
    monkeypatch.setitem(sys.modules, "flash_attn", _reference_flash(seen))
    pos = _positions([[9, 4, 13]])
    q, k, v = _qkv(1, pos.shape[1])
    seg = segments_of(pos, 1)
    got = flash_varlen(q, k, v.half(), seg, scale=0.3, window=6)
    assert seen == [(torch.float16,) * 3] and got.dtype == torch.float16
    want = varlen_attention_reference(q, k, v, seg, scale=0.3, window=6)
    torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=2e-3)  # fp16 inputs

    # All fp32 and no autocast: not FlashAttention's to take; the fp32 path, exactly.
    got = flash_varlen(q, k, v, seg, scale=0.3)
    assert len(seen) == 1 and got.dtype == torch.float32
    torch.testing.assert_close(got, varlen_attention_reference(q, k, v, seg, scale=0.3), **TOL)


def test_torch_varlen_call_layout(monkeypatch):
    # torch.nn.attention.varlen.varlen_attn runs on CUDA only: a stand-in with its documented
    # contract ([tokens, H, D], cu_seq, window_size=(left, right), enable_gqa) checks the call.
    import torch.nn.attention.varlen as varlen

    from baton.kernels.varlen_attention import torch_varlen

    calls = []

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                    enable_gqa=False, **_):
        calls.append((window_size, enable_gqa, max_q))
        flash = _reference_flash([]).flash_attn_varlen_func
        return flash(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=True,
                     window_size=window_size)

    monkeypatch.setattr(varlen, "varlen_attn", varlen_attn)
    pos = _positions([[9, 4, 13], [20, 6]])
    q, k, v = (t.detach().bfloat16() for t in _qkv(2, pos.shape[1]))
    seg = segments_of(pos, 2)
    got = torch_varlen(q, k, v, seg, scale=0.3, window=6)
    assert calls == [((5, 0), True, 20)]
    want = varlen_attention_reference(q.float(), k.float(), v.float(), seg, scale=0.3, window=6)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)  # bf16 inputs


def _gpu_paths() -> list:
    from baton.kernels.varlen_attention import flash_available

    if not torch.cuda.is_available():
        return [pytest.param(None, marks=pytest.mark.skip(reason="needs a CUDA GPU"))]
    from baton.kernels.varlen_attention import torch_varlen_available

    paths = [SDPA_SPANS, EFFICIENT_VARLEN]
    if torch.cuda.get_device_capability() >= (8, 0):
        paths += [FLASH_VARLEN] if flash_available() else []
        paths += [TORCH_VARLEN] if torch_varlen_available() else []
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


def test_several_buckets_under_non_reentrant_checkpointing():
    # The training setup: the attention inside torch.utils.checkpoint (non-reentrant), whose
    # saved tensors may be unpacked once only; three buckets here.
    from torch.utils.checkpoint import checkpoint

    pos = _positions([[40, 2, 3, 17]])
    q, k, v = _qkv(1, pos.shape[1])
    seg = segments_of(pos, 1)
    got, got_grads = _grads(lambda *a, **kw: checkpoint(sdpa_spans, *a, use_reentrant=False,
                                                        **kw), q, k, v, seg, scale=0.3)
    want, want_grads = _grads(varlen_attention_reference, q, k, v, seg, scale=0.3)
    torch.testing.assert_close(got, want, **TOL)
    for name, a, b in zip("qkv", got_grads, want_grads):
        torch.testing.assert_close(a, b, **TOL, msg=f"d{name}")
