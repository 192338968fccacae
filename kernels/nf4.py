"""Dequantization of bitsandbytes NF4 weights (`Params4bit`) in one Triton kernel.

The bitsandbytes format, as 0.50 writes it (`functional.quantize_4bit`):
- `weight`: the flattened `[out, in]` matrix as packed nibbles, two a byte, the element with the
  even flat index in the high nibble; shape `[(numel + 1) // 2, 1]`, uint8 (or another
  `quant_storage` dtype holding the same bytes).
- `quant_state.absmax`: one fp32 scale per `blocksize` consecutive flat elements (the last block
  may be short), or with double quantization (`nested`): one uint8 code per block, decoded as
  `state2.code[q] * state2.absmax[block // state2.blocksize] + offset`.
- `quant_state.code`: the 16-value NF4 table; a value is `code[nibble] * absmax[block]`, computed
  in fp32 and rounded once to the output dtype.

The kernel follows that arithmetic step by step, so its output is bit-identical to
`bitsandbytes.functional.dequantize_4bit` in fp32, fp16 and bf16. Floating-point contraction is
turned off at launch: an FMA in the nested-absmax decode would round differently from
bitsandbytes, which multiplies and adds in two separate kernels.

The layout is the flat one of bitsandbytes' CUDA and portable PyTorch kernels. Its CPU C
kernel (0.50.2, AVX-512) disagrees, wrongly, on rows that straddle 64-blocks with an even
length (in_features 32, 48, 80, 96, 160...); real models' widths are multiples of 64.
"""

from __future__ import annotations

import torch

from baton.kernels._triton import tl, triton  # stand-ins when triton is absent
from baton.kernels.dispatch import check_launchable
from baton.kernels.guard import on_tensor_device

_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BYTES_PER_PROGRAM = 1024  # 2048 outputs a program: large enough to amortise the launch


class NF4FormatError(ValueError):
    """A quantized weight is not in the NF4 layout this kernel reads."""


@triton.jit
def _nf4_dequant_kernel(
    OUT, PACKED, ABSMAX, CODE, ABSMAX2, CODE2, OFFSET,
    n_elements, n_bytes,
    HALF_BLOCK: tl.constexpr, BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    # The block sizes are compile-time constants (64 and 256 in practice), so the index
    # divisions become shifts.
    # One program decodes BLOCK bytes into 2 * BLOCK outputs. A quantization block holds an
    # even number of elements, so both nibbles of a byte share one absmax.
    pid = tl.program_id(0).to(tl.int64)
    byte_idx = pid * BLOCK + tl.arange(0, BLOCK)
    byte_ok = byte_idx < n_bytes
    packed = tl.load(PACKED + byte_idx, mask=byte_ok, other=0).to(tl.int32)
    block = byte_idx // HALF_BLOCK
    if NESTED:
        q = tl.load(ABSMAX + block, mask=byte_ok, other=0).to(tl.int32)
        scale2 = tl.load(ABSMAX2 + block // BLOCKSIZE2, mask=byte_ok, other=0.0)
        scale = tl.load(CODE2 + q, mask=byte_ok, other=0.0) * scale2
        scale = scale + tl.load(OFFSET)
    else:
        scale = tl.load(ABSMAX + block, mask=byte_ok, other=0.0)
    hi = tl.load(CODE + (packed >> 4), mask=byte_ok, other=0.0) * scale
    lo = tl.load(CODE + (packed & 0xF), mask=byte_ok, other=0.0) * scale
    values = tl.interleave(hi, lo)
    if OUT_BF16:
        values = _round_to_bf16(values)
    else:
        values = values.to(OUT.dtype.element_ty)
    out_idx = pid * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(OUT + out_idx, values, mask=out_idx < n_elements)


@triton.jit
def _round_to_bf16(x):
    # fp32 -> bf16, round to nearest even, in integer arithmetic. The GPU's own cast does the
    # same, but Triton's CPU interpreter truncates; spelling it out keeps both bit-exact.
    # NF4 values are finite, so NaN handling is not needed.
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


def _packed_bytes(weight: torch.Tensor) -> torch.Tensor:
    """The packed nibbles as a flat uint8 tensor, whatever `quant_storage` dtype holds them."""
    data = weight.data if isinstance(weight, torch.nn.Parameter) else weight
    data = data.contiguous()
    if data.dtype != torch.uint8:
        data = data.view(torch.uint8)
    return data.reshape(-1)


def _check_state(quant_state, out_dtype: torch.dtype | None) -> torch.dtype:
    """Validate the format; return the output dtype (the state's own dtype by default)."""
    if quant_state is None:
        raise NF4FormatError(
            "the weight has no quant_state: it is not a quantized bitsandbytes Params4bit "
            "(was the model loaded with load_in_4bit=True and moved to its device?)"
        )
    if quant_state.quant_type != "nf4":
        raise NF4FormatError(
            f"quant_type is {quant_state.quant_type!r}; only 'nf4' is supported: load the model "
            "with bnb_4bit_quant_type='nf4'."
        )
    if quant_state.blocksize % 2:
        raise NF4FormatError(
            f"blocksize {quant_state.blocksize} is odd; bitsandbytes never writes that"
        )
    out_dtype = out_dtype or quant_state.dtype
    if out_dtype not in _OUT_DTYPES:
        raise NF4FormatError(f"out_dtype must be float32, float16 or bfloat16, not {out_dtype}")
    return out_dtype


def _absmax_args(quant_state, device: torch.device):
    """Kernel arguments for the per-block scales: (absmax, absmax2, code2, offset, blocksize2).

    The offset stays a device tensor: reading it as a Python number would sync the GPU on
    every dequantization. Unused pointers repeat `absmax`; the kernel never reads them.
    """
    if not quant_state.nested:
        absmax = quant_state.absmax.to(device=device, dtype=torch.float32).contiguous()
        return absmax, absmax, absmax, absmax, 1
    state2 = quant_state.state2
    return (
        quant_state.absmax.to(device).contiguous(),
        state2.absmax.to(device=device, dtype=torch.float32).contiguous(),
        state2.code.to(device=device, dtype=torch.float32).contiguous(),
        _offset_tensor(quant_state.offset, device),
        int(state2.blocksize),
    )


def _offset_tensor(offset, device: torch.device) -> torch.Tensor:
    if isinstance(offset, torch.Tensor):
        return offset.to(device=device, dtype=torch.float32).reshape(1)
    return torch.tensor([float(offset)], dtype=torch.float32, device=device)


@on_tensor_device
def dequantize_nf4(
    weight: torch.Tensor, quant_state, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Dequantize a bitsandbytes NF4 weight to a dense `quant_state.shape` tensor.

    `weight` is the `Params4bit` (or its packed data tensor), `quant_state` its
    `bitsandbytes.functional.QuantState`; `out_dtype` defaults to `quant_state.dtype`.
    """
    out_dtype = _check_state(quant_state, out_dtype)
    packed = _packed_bytes(weight)
    check_launchable(packed)
    shape = tuple(quant_state.shape)
    n_elements = int(torch.Size(shape).numel())
    n_bytes = (n_elements + 1) // 2
    if packed.numel() < n_bytes:
        raise NF4FormatError(
            f"packed weight holds {packed.numel()} bytes but shape {shape} needs {n_bytes}: "
            "the weight and its quant_state do not belong together"
        )
    absmax, absmax2, code2, offset, blocksize2 = _absmax_args(quant_state, packed.device)
    code = quant_state.code.to(device=packed.device, dtype=torch.float32).contiguous()
    out = torch.empty(shape, dtype=out_dtype, device=packed.device)
    grid = (triton.cdiv(n_bytes, _BYTES_PER_PROGRAM),)
    _nf4_dequant_kernel[grid](
        out, packed, absmax, code, absmax2, code2, offset,
        n_elements, n_bytes, HALF_BLOCK=quant_state.blocksize // 2, BLOCKSIZE2=blocksize2,
        NESTED=bool(quant_state.nested), OUT_BF16=out_dtype == torch.bfloat16,
        BLOCK=_BYTES_PER_PROGRAM, enable_fp_fusion=False,
    )
    return out


def _reference_absmax(quant_state, device: torch.device) -> torch.Tensor:
    if not quant_state.nested:
        return quant_state.absmax.to(device=device, dtype=torch.float32)
    state2 = quant_state.state2
    codes = state2.code.to(device)[quant_state.absmax.to(device).long()]
    scale2 = state2.absmax.to(device).float().repeat_interleave(state2.blocksize)
    absmax = codes * scale2[: codes.numel()]
    # Added in a second step, as bitsandbytes does, so the rounding is the same.
    return absmax + _offset_tensor(quant_state.offset, device)


def dequantize_nf4_reference(
    weight: torch.Tensor, quant_state, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Plain-PyTorch twin of `dequantize_nf4`: same arguments, same bits."""
    out_dtype = _check_state(quant_state, out_dtype)
    packed = _packed_bytes(weight)
    shape = tuple(quant_state.shape)
    n_elements = int(torch.Size(shape).numel())
    nibbles = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n_elements]
    values = quant_state.code.to(packed.device).float()[nibbles.long()]
    absmax = _reference_absmax(quant_state, packed.device)
    scale = absmax.repeat_interleave(quant_state.blocksize)[:n_elements]
    return (values * scale).to(out_dtype).reshape(shape)
