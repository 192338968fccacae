"""scripts/bench.py on the CPU: the tiny preset end to end, the NF4 timing mode, the presets.

The end-to-end run forces the Triton path (in the interpreter) so that NF4 + PEFT + gradient
checkpointing + every patched kernel run together; the two implementations must give the
same per-step losses within 1e-4 (fp32 on the CPU).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench.py"


def _run_bench(tmp_path: Path, *args: str, **env: str) -> dict:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), *args, "--device", "cpu", "--json", str(out)],
        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_tiny_both_impls_report_throughput_and_matching_losses(tmp_path):
    result = _run_bench(tmp_path, "--preset", "tiny", "--impl", "both", "--steps", "2",
                        "--seq-len", "32", BATON_KERNELS="triton", TRITON_INTERPRET="1")
    assert result["preset"] == "tiny" and result["device"] == "cpu" and result["steps"] == 2
    hf, baton = result["runs"]["hf"], result["runs"]["baton"]
    assert "kernels" not in hf
    assert baton["kernels"] == "triton"
    assert baton["patched"] == ["rmsnorm", "rope", "swiglu", "fused_linear_cross_entropy",
                                "fused_lora"]
    for run in (hf, baton):
        assert len(run["losses"]) == 2 and len(run["step_seconds"]) == 2
        assert run["tokens_per_s"] > 0 and run["tokens_per_s_incl_first"] > 0
        assert all(4.0 < loss < 7.0 for loss in run["losses"])  # about ln(320) at random init
    assert result["max_loss_diff"] == pytest.approx(
        max(abs(a - b) for a, b in zip(hf["losses"], baton["losses"])))
    assert result["max_loss_diff"] < 1e-4


def test_nf4_kernel_mode_times_both_and_matches_bitsandbytes(tmp_path):
    result = _run_bench(tmp_path, "--kernel", "nf4", "--preset", "tiny", "--min-run-time", "0.05",
                        TRITON_INTERPRET="1")
    nf4 = result["nf4"]
    assert nf4["shape"] == [192, 64] and nf4["bitsandbytes_s"] > 0
    assert "note" not in nf4, nf4["note"]  # kernels/nf4.py is ours: it must run, not be skipped
    assert nf4["baton_s"] > 0 and nf4["max_abs_diff"] == 0.0


def test_presets_are_the_published_architectures():
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    # Parameter counts of the published checkpoints (Qwen2.5 ties lm_head to the embeddings).
    published = {"llama-3.1-8b": 8_030_261_248, "mistral-7b": 7_248_023_552,
                 "qwen2.5-1.5b": 1_543_714_304}
    for preset, count in published.items():
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(bench.preset_config(preset))
        model.tie_weights()
        assert model.num_parameters() == count, preset


def test_max_loss_diff_needs_both_runs():
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench

    assert bench.max_loss_diff({"hf": {"losses": [1.0, 2.0]}}) is None
    runs = {"hf": {"losses": [1.0, 2.0]}, "baton": {"losses": [1.5, 1.75]}}
    assert bench.max_loss_diff(runs) == 0.5
