"""The start-up probe's body: each Triton op a session will use, once, on the run's shapes.

A Triton compile error raises, but an LLVM abort (or a bad launch that corrupts the CUDA
context) kills the whole process. So the session (session/probe.py) runs this module in a
child process before it loads the model:

    python -m baton.kernels.probe < job.json

The job names the device, the compute dtype and the model's sizes (hidden, intermediate,
heads, head_dim, vocabulary, LoRA rank, NF4 or dense base). Each op runs forward and backward
on `tokens` rows, the session's first micro-batch (the loss on one chunk of it), so that its
tile sizes, warps and Triton's row-count specialisations are the first step's own; and its
forward is held to its plain-PyTorch reference loosely (a kernel that compiles but computes
garbage fails too). Before each op the child prints `{"op": name}`, after it `{"op": name,
"ok": true, "seconds": s}`, so the parent can name the op that was running when the child
died. Triton keeps what it compiled in its disk cache; the session's first step reuses a
kernel only where its launch matches (block sizes that follow the row count, and Triton's
specialisation of sizes divisible by 16, may differ), and compiles the others again.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Forward against the reference, relative to the reference's largest value: loose on
# purpose (fp16 / bf16 rounding of whole rows), far below what a wrong kernel gives.
REL_TOL = {"fp16": 2e-2, "bf16": 5e-2, "fp32": 1e-3}


class ProbeMismatch(RuntimeError):
    """A kernel ran but its output is not the reference's."""


@dataclass
class ProbeJob:
    device: str
    precision: str  # "fp16" | "bf16" | "fp32": the autocast dtype of the run
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rank: int = 16
    nf4: bool = False
    eps: float = 1e-6
    tokens: int = 16
    ops: list[str] = field(default_factory=list)  # empty: every op in OPS
    # The family's variants (kernels/architectures.py): Gemma's (1 + w) RMSNorm and the
    # fp32-then-cast ones, and partial rotary (the rotated width; 0: the whole head).
    norm_offset: float = 0.0
    norm_cast_after: bool = False
    rotary_dim: int = 0

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    @property
    def stream_dtype(self) -> torch.dtype:
        # The residual stream is fp32 under fp16 (training.model.residual_stream_fp32).
        return torch.float32 if self.precision == "fp16" else self.dtype


def _rand(job: ProbeJob, *shape: int, dtype=None, grad: bool = True) -> torch.Tensor:
    t = torch.randn(*shape, device=job.device, dtype=dtype or job.dtype) * 0.5
    return t.requires_grad_(grad)


def _compare(got: torch.Tensor, want: torch.Tensor, job: ProbeJob, what: str) -> None:
    scale = want.detach().float().abs().max().clamp_min(1e-6)
    err = float((got.detach().float() - want.detach().float()).abs().max() / scale)
    if not err <= REL_TOL[job.precision]:  # also catches NaN
        raise ProbeMismatch(f"{what}: relative error {err:.2e} against the reference")


def _backward(*outs: torch.Tensor) -> None:
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])


def probe_rmsnorm(job: ProbeJob) -> None:
    from baton.kernels.rmsnorm import rmsnorm, rmsnorm_reference

    x = _rand(job, job.tokens, job.hidden, dtype=job.stream_dtype)
    # A 4-bit model keeps its norms in fp32 (PEFT's kbit preparation); a 16-bit one in its dtype.
    w = torch.ones(job.hidden, device=job.device, dtype=torch.float32 if job.nf4 else job.dtype,
                   requires_grad=True)
    args = (job.eps, job.norm_offset, job.norm_cast_after)
    y = rmsnorm(x, w, *args)
    _compare(y, rmsnorm_reference(x, w, *args), job, "rmsnorm")
    _backward(y)


def probe_rope(job: ProbeJob) -> None:
    from baton.kernels.rope import apply_rope, rope_reference

    q = _rand(job, 1, job.heads, job.tokens, job.head_dim)
    k = _rand(job, 1, job.kv_heads, job.tokens, job.head_dim)
    angles = torch.rand(1, job.tokens, job.rotary_dim or job.head_dim, device=job.device)
    cos, sin = angles.cos().to(job.dtype), angles.sin().to(job.dtype)
    got = apply_rope(q, k, cos, sin)
    want = rope_reference(q, k, cos, sin)
    _compare(got[0], want[0], job, "rope q")
    _backward(*got)


def probe_swiglu(job: ProbeJob) -> None:
    from baton.kernels.swiglu import swiglu, swiglu_reference

    gate, up = (_rand(job, job.tokens, job.intermediate) for _ in range(2))
    h = swiglu(gate, up)
    _compare(h, swiglu_reference(gate, up), job, "swiglu")
    _backward(h)


def probe_geglu(job: ProbeJob) -> None:
    from baton.kernels.geglu import geglu, geglu_reference

    gate, up = (_rand(job, job.tokens, job.intermediate) for _ in range(2))
    h = geglu(gate, up)
    _compare(h, geglu_reference(gate, up), job, "geglu")
    _backward(h)


def probe_cross_entropy(job: ProbeJob) -> None:
    """The fused loss's Triton part: softmax gradient rows over the whole vocabulary (the
    logits matmul around it is torch's)."""
    from baton.kernels.cross_entropy import ce_grad_reference, ce_grad_triton, default_chunk_size

    rows = default_chunk_size(job.tokens, job.vocab)  # one chunk of the session's loss
    logits = torch.randn(rows, job.vocab, device=job.device) * 2
    labels = torch.randint(0, job.vocab, (rows,), device=job.device)
    mine, theirs = logits.clone(), logits.clone()
    loss = ce_grad_triton(mine, labels, 1.0)
    _compare(loss, ce_grad_reference(theirs, labels, 1.0), job, "cross-entropy loss")


def _projection(job: ProbeJob, d_in: int, d_out: int):
    from baton.kernels.lora import Projection

    w = torch.randn(d_out, d_in, device=job.device) / d_in ** 0.5
    state = None
    if job.nf4:
        import bitsandbytes.functional as bnbf

        w, state = bnbf.quantize_4bit(w.to(job.dtype), quant_type="nf4",
                                      compress_statistics=True)
    else:
        w = w.to(job.dtype)
    a = _rand(job, job.rank, d_in, dtype=torch.float32) / d_in ** 0.5
    b = _rand(job, d_out, job.rank, dtype=torch.float32) / job.rank ** 0.5
    return Projection(w, state, None, a.detach().requires_grad_(),
                      b.detach().requires_grad_(), 2.0)


def _lora(job: ProbeJob, fused: Callable, reference: Callable, shapes, d_in: int, what: str):
    projections = [_projection(job, i, o) for i, o in shapes]
    x = _rand(job, job.tokens, d_in, dtype=job.stream_dtype)
    with torch.autocast(torch.device(job.device).type, dtype=job.dtype,
                        enabled=job.precision != "fp32"):
        got = fused(x, *projections)
        want = reference(x, *projections)
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    _compare(got[0], want[0], job, what)
    _backward(*got)


def probe_lora_qkv(job: ProbeJob) -> None:
    from baton.kernels.lora import lora_qkv, lora_qkv_reference

    q, kv = job.heads * job.head_dim, job.kv_heads * job.head_dim
    _lora(job, lora_qkv, lora_qkv_reference, [(job.hidden, q), (job.hidden, kv),
                                              (job.hidden, kv)], job.hidden, "fused LoRA QKV")


def probe_lora_linear(job: ProbeJob) -> None:
    from baton.kernels.lora import lora_linear, lora_linear_reference

    d_in = job.heads * job.head_dim
    _lora(job, lora_linear, lora_linear_reference, [(d_in, job.hidden)], d_in,
          "fused LoRA O projection")


def probe_lora_mlp(job: ProbeJob) -> None:
    from baton.kernels.lora import lora_mlp, lora_mlp_reference

    h, m = job.hidden, job.intermediate
    _lora(job, lora_mlp, lora_mlp_reference, [(h, m), (h, m), (m, h)], h, "fused LoRA MLP")


# In the order a training step first meets them.
OPS: dict[str, Callable[[ProbeJob], None]] = {
    "rmsnorm": probe_rmsnorm, "rope": probe_rope, "swiglu": probe_swiglu, "geglu": probe_geglu,
    "lora_qkv": probe_lora_qkv, "lora_linear": probe_lora_linear, "lora_mlp": probe_lora_mlp,
    "cross_entropy": probe_cross_entropy,
}


def _say(**fields) -> None:
    # One line each, flushed at once: the parent reads what was printed before a crash.
    print(json.dumps(fields), flush=True)


def run(job: ProbeJob) -> None:
    """Run the job's ops in OPS order; the first failure propagates."""
    torch.manual_seed(0)
    if torch.device(job.device).type == "cuda":
        torch.cuda.set_device(torch.device(job.device))
    for name in [op for op in OPS if op in job.ops or not job.ops]:
        _say(op=name)
        started = time.perf_counter()
        OPS[name](job)
        if torch.device(job.device).type == "cuda":
            torch.cuda.synchronize()  # an asynchronous launch error belongs to this op
        _say(op=name, ok=True, seconds=round(time.perf_counter() - started, 3))


def main() -> int:
    job = ProbeJob(**json.loads(sys.stdin.read()))
    try:
        run(job)
    except Exception as exc:  # any failure of a kernel is the answer, not a crash of the probe
        _say(error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
