"""Record the Triton launches a real training session makes, for ahead-of-time compiles.

    TRITON_INTERPRET=1 BATON_KERNELS=triton python scripts/aot_record.py [--model DIR] [--out F]

Runs Baton's engine (`training.engine.Trainer`, through the bench's data setup) under Triton's
interpreter with the Triton kernels forced, one optimizer step in each precision a session
uses (fp32; fp16 autocast with its loss scaler, a T4's; bf16 autocast, sm_80+'s), on SmolLM2's
shapes (the real model cut to 1 of its 30 layers: every layer launches the same kernels) and
the demo's chat records, micro-batch 2 of up to 96 tokens. Each distinct launch (kernel,
argument types, constexprs, warps) is written once; `aot_kernels.compile_recorded` compiles
exactly those.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PRECISIONS = ("fp32", "fp16", "bf16")


def _one_layer_model(source: Path, folder: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from baton.training.model import PLAIN_MODULES

    model = AutoModelForCausalLM.from_pretrained(source, num_hidden_layers=1,
                                                 dtype=torch.float32, **PLAIN_MODULES)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def record(model_dir: Path, work: Path) -> list[dict]:
    """The distinct launches of one step in each precision, in a stable order."""
    import torch

    from baton.scripts.aot_kernels import record_launches
    from baton.scripts.bench_data import run_spec
    from baton.scripts.bench_train import data_run
    from baton.scripts.demo_data import write_jsonl

    data = write_jsonl(work / "demo_chat.jsonl", 40, chat=True)
    model = _one_layer_model(model_dir, work / "model")
    launches: dict[str, dict] = {}
    for precision in PRECISIONS:
        spec = run_spec(model, data, seq_len=96, micro=2, steps=1, seed=3407)
        args = types.SimpleNamespace(spec=spec, data=data, batch_size=2, device="cpu",
                                     precision=precision, padding_free=True, steps=1,
                                     seed=3407)
        _, step = data_run("baton", args, torch.device("cpu"), {})
        with record_launches() as seen:
            step()
        launches.update(seen)
    with record_launches() as seen:
        _rmsnorm_launches(576, rows=2 * 96)
    launches.update(seen)
    return [launches[key] for key in sorted(launches)]


def _rmsnorm_launches(hidden: int, rows: int) -> None:
    """RMSNorm through its launchers, forward and backward, in the dtypes a session gives it:
    fp32 in and out (fp32 runs; fp16 and bf16 runs' residual stream, weights upcast by PEFT's
    kbit preparation), and 16-bit activations with 16-bit weights. The engine's step under
    the interpreter did not reach the Triton RMSNorm here (it ran the reference), so these
    launches are made directly, with the session's own row count and width."""
    import torch

    from baton.kernels.rmsnorm import rmsnorm

    for x_dtype, w_dtype in ((torch.float32, torch.float32), (torch.float16, torch.float16),
                             (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)):
        x = torch.randn(rows, hidden, dtype=x_dtype, requires_grad=True)
        w = torch.ones(hidden, dtype=w_dtype, requires_grad=True)
        rmsnorm(x, w, 1e-5).float().sum().backward()


def main(argv=None) -> int:
    from baton.scripts.aot_kernels import SIGNATURES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a model folder (default: SmolLM2-135M)")
    parser.add_argument("--out", type=Path, default=SIGNATURES)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("BATON_KERNELS") != "triton":
        print("run with TRITON_INTERPRET=1 BATON_KERNELS=triton (the kernels, interpreted)",
              file=sys.stderr)
        return 2
    import tempfile

    from baton.scripts.real_model import ensure_model

    model = args.model or ensure_model()
    with tempfile.TemporaryDirectory() as tmp:
        launches = record(Path(model), Path(tmp))
    args.out.write_text(json.dumps({"source": "SmolLM2-135M (1 layer), fp32/fp16/bf16, "
                                              "micro-batch 2, seq <= 96",
                                    "launches": launches}, indent=1) + "\n")
    print(f"{len(launches)} launches written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
