"""NF4 dequantization: the Triton kernel (in Triton's CPU interpreter) and its PyTorch reference
must reproduce bitsandbytes' own dequantization bit for bit.

Two oracles. The public `bitsandbytes.functional.dequantize_4bit`, which on the CPU runs
bitsandbytes' C kernel; that kernel (0.50.2, AVX-512 build) mis-scales some elements when a row
is not a whole number of 64-blocks and its length is even (in_features 32, 48, 80, 96, 160...),
so it is the oracle only for shapes it gets right. And bitsandbytes' portable PyTorch kernel
(`backends/default/ops.py`, the flat layout its CUDA kernel also uses), for every shape.
"""

from __future__ import annotations

import os

# Must precede the first import of a Triton kernel module: @triton.jit picks the interpreter
# when it decorates.
os.environ.setdefault("TRITON_INTERPRET", "1")

import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as bnbf  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from bitsandbytes.backends.default import ops as bnb_default_ops  # noqa: E402
from bitsandbytes.backends.utils import _get_4bit_code  # noqa: E402

from baton.kernels.nf4 import NF4FormatError, dequantize_nf4, dequantize_nf4_reference  # noqa: E402
from tests.native_device import DEVICE, ON_CUDA, ulp  # noqa: E402

OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Odd and short shapes on purpose: numel not a multiple of the 64-block (a short last block),
# odd numel (a half-used last byte), fewer elements than one block, more than 256 blocks
# (several double-quant groups). All within what bitsandbytes' CPU C kernel gets right.
SHAPES = [(96, 192), (200, 64), (7, 9), (3, 5), (1, 1), (130, 300)]
# Rows that straddle 64-blocks with an even length: only the portable oracle is trusted.
STRADDLING_SHAPES = [(64, 96), (2, 160), (3, 32), (5, 48), (33, 80)]


def _generator(shape, nested: bool) -> torch.Generator:
    return torch.Generator().manual_seed(shape[0] * 7919 + shape[1] * 31 + int(nested))


def _quantize(shape, nested: bool, src_dtype=torch.float32, scale=0.05, **kwargs):
    w = (torch.randn(shape, generator=_generator(shape, nested)) * scale).to(src_dtype)
    return bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=nested, **kwargs)


def _portable_bnb(packed, state, out_dtype) -> torch.Tensor:
    """bitsandbytes' portable dequantization, uncompiled, with its own nested-absmax decode."""
    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2)
        absmax += state.offset
    compute = bnb_default_ops._dequantize_4bit_compute.__wrapped__  # skip torch.compile
    code = _get_4bit_code("nf4", packed.device)
    flat = packed.view(torch.uint8).reshape(-1)
    return compute(flat, absmax.float(), code, state.blocksize, state.shape, out_dtype)


def _assert_bit_exact(packed, state, out_dtype, oracle: str = "public") -> None:
    state.dtype = out_dtype  # bitsandbytes dequantizes to quant_state.dtype
    if oracle == "public":
        expected = bnbf.dequantize_4bit(packed, state)
    else:
        expected = _portable_bnb(packed, state, out_dtype)
    got = dequantize_nf4(packed, state, out_dtype)
    ref = dequantize_nf4_reference(packed, state, out_dtype)
    assert got.dtype == out_dtype and got.shape == expected.shape == tuple(state.shape)
    if ON_CUDA and oracle == "public":
        # bitsandbytes' CUDA kernel may contract absmax2 * code2 + offset into an FMA where
        # ours (enable_fp_fusion=False) rounds twice: one rounding of the fp32 scale apart,
        # which the cast to out_dtype keeps within 1 ulp of it.
        diff = (got.float() - expected.float()).abs()
        assert (diff <= ulp(out_dtype) * expected.float().abs()).all(), f"max diff {diff.max()}"
    else:  # the CPU, and the portable oracle on any device: the same arithmetic, bit for bit
        assert torch.equal(got, expected), f"max diff {(got.float() - expected.float()).abs().max()}"
    ref_diff = (ref.float() - expected.float()).abs().max()
    assert torch.equal(ref, expected), f"reference max diff {ref_diff}"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double-quant"])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
def test_matches_bitsandbytes_bit_for_bit(shape, nested, out_dtype):
    packed, state = _quantize(shape, nested)
    _assert_bit_exact(packed, state, out_dtype)
    _assert_bit_exact(packed, state, out_dtype, oracle="portable")


@pytest.mark.parametrize("shape", STRADDLING_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
def test_rows_straddling_blocks_match_portable_bitsandbytes(shape, out_dtype):
    packed, state = _quantize(shape, nested=True)
    _assert_bit_exact(packed, state, out_dtype, oracle="portable")
    # The flat layout really is the format: dequantized values sit within NF4's error of the
    # original weight (the largest gap in the NF4 table is 0.32 of a block's absmax).
    weight = (torch.randn(shape, generator=_generator(shape, True)) * 0.05)
    err = (dequantize_nf4(packed, state, torch.float32) - weight).abs().max()
    assert err <= 0.17 * weight.abs().max()


@pytest.mark.parametrize("src_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_source_weights(src_dtype):
    packed, state = _quantize((64, 128), nested=True, src_dtype=src_dtype)
    for out_dtype in OUT_DTYPES:
        _assert_bit_exact(packed, state, out_dtype)


@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_other_blocksizes(blocksize):
    packed, state = _quantize((48, 256), nested=True, blocksize=blocksize)
    _assert_bit_exact(packed, state, torch.bfloat16)
    _assert_bit_exact(packed, state, torch.float32)
    packed, state = _quantize((37, 80), nested=True, blocksize=blocksize)
    _assert_bit_exact(packed, state, torch.float16, oracle="portable")


# fp16 overflowing to inf is intended here; numpy warns about it under the interpreter.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_wide_dynamic_range():
    # Large and tiny blocks side by side: fp16 overflows to inf on the large ones exactly as
    # bitsandbytes does, bf16 keeps them; both must round the same way.
    packed, state = _quantize((16, 128), nested=False, scale=1.0)
    state.absmax[::3] *= 1e5
    state.absmax[1::3] *= 1e-6
    for out_dtype in OUT_DTYPES:
        _assert_bit_exact(packed, state, out_dtype)


def test_bf16_rounds_half_to_even():
    # code 1.0 (nibble 15) times these scales lands exactly halfway between two bf16 values:
    # 1 + 2^-8 rounds down to the even 1.0, 1 + 3 * 2^-8 rounds up to the even 1.015625.
    # Truncation (Triton's interpreter cast) or round-half-up would get one of them wrong.
    packed = torch.full((64,), 0xFF, dtype=torch.uint8)
    absmax = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8], dtype=torch.float32)
    code = bnbf.get_4bit_type("nf4", device=DEVICE)
    state = bnbf.QuantState(absmax, shape=(2, 64), code=code, blocksize=64, quant_type="nf4")
    got = dequantize_nf4(packed, state, torch.bfloat16)
    assert got[0].unique().tolist() == [1.0] and got[1].unique().tolist() == [1.015625]
    _assert_bit_exact(packed, state, torch.bfloat16)


def test_params4bit_of_a_linear4bit_layer():
    layer = bnb.nn.Linear4bit(72, 40, bias=False, quant_type="nf4", compress_statistics=True)
    layer = layer.to(DEVICE)  # quantizes the weight
    weight = layer.weight
    assert isinstance(weight, bnb.nn.Params4bit) and weight.quant_state is not None
    expected = bnbf.dequantize_4bit(weight, weight.quant_state)
    assert torch.equal(dequantize_nf4(weight, weight.quant_state), expected)


def test_non_uint8_quant_storage():
    # FSDP-style storage: the same bytes held in a bf16 tensor.
    packed, state = _quantize((32, 64), nested=True, quant_storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    _assert_bit_exact(packed, state, torch.float16)


def test_rejects_fp4():
    w = torch.randn(8, 64)
    packed, state = bnbf.quantize_4bit(w, quant_type="fp4")
    with pytest.raises(NF4FormatError, match="nf4"):
        dequantize_nf4(packed, state, torch.float32)


def test_rejects_missing_quant_state_and_mismatched_weight():
    with pytest.raises(NF4FormatError, match="quant_state"):
        dequantize_nf4(torch.zeros(32, 1, dtype=torch.uint8), None, torch.float32)
    packed, state = _quantize((8, 64), nested=False)
    with pytest.raises(NF4FormatError, match="do not belong together"):
        dequantize_nf4(packed[:10], state, torch.float32)
    with pytest.raises(NF4FormatError, match="out_dtype"):
        dequantize_nf4(packed, state, torch.int8)
