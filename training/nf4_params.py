"""The NF4 base as plain parameters FSDP2 can shard: packed bytes, absmax codes, their scales.

bitsandbytes' `Params4bit` keeps its quantization state beside the tensor, where FSDP cannot see
it, and its bytes in a storage dtype FSDP may cast (accelerate #3983, bitsandbytes #1945). Here
every part of a quantized weight is an `nn.Parameter` of its own, frozen:

- `packed`: the flat packed nibbles, uint8, exactly bitsandbytes' bytes;
- `absmax`: one scale a 64-block: uint8 codes (double quantization) or fp32;
- `absmax2`: the fp32 scales of those codes, one a 256-block (double quantization only);

and the 16- and 256-entry code tables and the offset are buffers (replicated: 1 KiB a layer).
FSDP2 shards each parameter on dim 0 and, since a layer's parameters differ in dtype, gathers
them all as uint8 (torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py): the bytes on the
wire are the 4-bit weights, copied, never cast. After the gather `forward` dequantizes with
Baton's NF4 kernel (kernels/nf4.py, bit-identical to bitsandbytes) and multiplies.

Why not a tensor subclass with `fsdp_pre_all_gather`/`fsdp_post_all_gather` (torchao's
NF4Tensor)? Those hooks exist to gather several inner tensors of ONE parameter; with each part a
parameter of its own FSDP2 gathers them with no hook at all. And torchao's NF4Tensor (0.18) does
not hold bitsandbytes' quantization: its scales are int8-quantized another way (docs/DESIGN.md,
"Sharded sessions"), so a handoff to a single-GPU bitsandbytes session would change the weights.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from baton.kernels.nf4 import dequantize_nf4, dequantize_nf4_reference


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    # A view of bitsandbytes' own storage, not a copy: converting a 9 GiB base must not need
    # 18 (FSDP2 then copies each rank's shard and the whole tensor is freed).
    return nn.Parameter(tensor.detach().reshape(-1), requires_grad=False)


class NF4Linear(nn.Module):
    """A frozen NF4 linear layer whose quantized bytes are ordinary parameters.

    Built from a bitsandbytes `Linear4bit` (`from_bnb`); computes what that layer computes: the
    input in the compute dtype, the dequantized weight, the bias, the output in the input's
    dtype."""

    def __init__(self, in_features: int, out_features: int, quant_state,
                 packed: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.shape = tuple(quant_state.shape)
        self.blocksize, self.quant_dtype = int(quant_state.blocksize), quant_state.dtype
        self.compute_dtype, self.nested = compute_dtype, bool(quant_state.nested)
        self.packed = _frozen(packed.view(torch.uint8) if packed.dtype != torch.uint8
                              else packed)
        self.absmax = _frozen(quant_state.absmax)
        self.register_buffer("code", quant_state.code.detach().float().clone())
        if self.nested:
            state2 = quant_state.state2
            self.absmax2 = _frozen(state2.absmax.float())
            self.blocksize2 = int(state2.blocksize)
            self.register_buffer("code2", state2.code.detach().float().clone())
            offset = torch.as_tensor(quant_state.offset, dtype=torch.float32)
            self.register_buffer("offset", offset.reshape(1).clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)

    @classmethod
    def from_bnb(cls, layer: nn.Module) -> "NF4Linear":
        state = layer.weight.quant_state
        compute = getattr(layer, "compute_dtype", None) or state.dtype
        return cls(layer.in_features, layer.out_features, state, layer.weight.data,
                   layer.bias, compute)

    def quant_state(self) -> SimpleNamespace:
        """The quantization state as kernels/nf4.py reads it (bitsandbytes' QuantState's
        fields), over this module's parameters: the gathered ones inside FSDP2's forward."""
        state2 = (SimpleNamespace(absmax=self.absmax2, code=self.code2,
                                  blocksize=self.blocksize2) if self.nested else None)
        return SimpleNamespace(quant_type="nf4", blocksize=self.blocksize, dtype=self.quant_dtype,
                               shape=torch.Size(self.shape), absmax=self.absmax,
                               code=self.code, nested=self.nested, state2=state2,
                               offset=self.offset if self.nested else None)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        # Triton on a GPU; on the CPU the plain-PyTorch twin (the same bits), even where
        # TRITON_INTERPRET is set for the kernel tests: the interpreter is for small shapes.
        cuda = self.packed.device.type == "cuda"
        dequantize = dequantize_nf4 if cuda else dequantize_nf4_reference
        return dequantize(self.packed, self.quant_state(), dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        out = _NF4Matmul.apply(x.to(self.compute_dtype), self)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(in_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4"


class _NF4Matmul(torch.autograd.Function):
    """x @ W.T with W dequantized in the forward and again in the backward, never saved: the
    autograd graph keeps the 4-bit bytes (the module), not a dense copy of every weight of the
    layer (bitsandbytes' MatMul4Bit does the same). Under FSDP2 the backward runs while the
    layer is gathered (its recompute gathered it), so the module's bytes are whole there."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: "NF4Linear") -> torch.Tensor:
        ctx.module = module
        return nn.functional.linear(x, module.dequantized(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight = ctx.module.dequantized(grad.dtype)
        return grad @ weight, None


def is_bnb_nf4(module: nn.Module) -> bool:
    """A bitsandbytes Linear4bit holding NF4 weights (looked up by name: no bnb import; PEFT's
    LoRA wrapper is also called Linear4bit, and is kept)."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return state is not None and getattr(state, "quant_type", None) == "nf4" and any(
        c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes")
        for c in type(module).__mro__)


def replace_bnb_layers(model: nn.Module) -> int:
    """Swap every bitsandbytes NF4 layer of `model` for an NF4Linear of the same bytes, in
    place (PEFT's LoRA layers keep theirs as `base_layer`); returns how many were swapped."""
    swaps = [(parent, name) for parent in model.modules()
             for name, child in parent.named_children() if is_bnb_nf4(child)]
    for parent, name in swaps:  # no list holds the bitsandbytes layers once swapped
        setattr(parent, name, NF4Linear.from_bnb(getattr(parent, name)))
    return len(swaps)


def nf4_bytes(model: nn.Module) -> int:
    """Bytes of every NF4Linear's quantized parameters (packed, absmax, absmax2) in `model`,
    counted on this rank: a shard's local bytes under FSDP2, the whole layer otherwise."""
    total = 0
    for module in model.modules():
        if isinstance(module, NF4Linear):
            for param in (module.packed, module.absmax, getattr(module, "absmax2", None)):
                if param is not None:
                    local = param.to_local() if hasattr(param, "to_local") else param
                    total += local.numel() * local.element_size()
    return total
