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
                        "--seq-len", "32", "--repeats", "1", BATON_KERNELS="triton",
                        TRITON_INTERPRET="1")
    assert result["preset"] == "tiny" and result["device"] == "cpu" and result["steps"] == 2
    assert result["precision"] == "fp32"  # the agent's policy on the CPU
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
                        "--precision", "bf16", TRITON_INTERPRET="1")
    nf4 = result["nf4"]
    assert result["precision"] == "bf16" and nf4["dtype"] == "bfloat16"  # as forced
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
                 "qwen2.5-1.5b": 1_543_714_304, "smollm2-135m": 134_515_008}
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


@pytest.mark.parametrize("capability, expected", [
    (None, "fp32"),  # CPU
    ((6, 0), "fp16"),  # P100
    ((7, 5), "fp16"),  # T4: is_bf16_supported() says True there (emulated); the agent says fp16
    ((8, 0), "bf16"),  # A100
    ((9, 0), "bf16"),  # H100
])
def test_auto_precision_is_the_agents_policy(capability, expected):
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench
    from baton.training.devices import precision_for

    assert bench.resolve_precision("auto", capability) == expected == precision_for(capability)
    for forced in ("fp32", "fp16", "bf16"):
        assert bench.resolve_precision(forced, capability) == forced


def test_forced_fp16_trains_with_a_loss_scaler_on_the_cpu(tmp_path):
    result = _run_bench(tmp_path, "--preset", "tiny", "--impl", "hf", "--steps", "2",
                        "--seq-len", "16", "--precision", "fp16")
    assert result["precision"] == "fp16"
    losses = result["runs"]["hf"]["losses"]
    assert len(losses) == 2 and all(4.0 < loss < 7.0 for loss in losses)


def test_nf4_kernel_bench_refuses_a_gpu_below_sm75():
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench
    from baton.kernels.dispatch import KernelChoiceError

    for capability in ((6, 0), (7, 0)):
        with pytest.raises(KernelChoiceError, match=r"sm_\d\d, below Triton's floor"):
            bench.check_kernel_device(capability)
    for capability in (None, (7, 5), (9, 0)):
        bench.check_kernel_device(capability)  # the CPU (interpreter) and T4 and newer run it


def test_a_kernel_path_the_device_cannot_run_exits_2(tmp_path):
    # BATON_KERNELS=triton on the CPU without the interpreter: the same KernelChoiceError a
    # P100 raises, and the bench answers it with exit 2 and the fix, not a traceback.
    out = tmp_path / "bench.json"
    env = {**os.environ, "BATON_KERNELS": "triton", "TRITON_INTERPRET": "0"}
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--preset", "tiny", "--impl", "baton", "--steps", "1",
         "--seq-len", "8", "--device", "cpu", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "TRITON_INTERPRET=1" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


# --- --model DIR --data FILE: a run's data, Baton through the engine, HF padded ------------

FIELDS = ("tokens_per_s", "token_efficiency", "matmul_flops_per_token", "oom")


def test_real_data_reports_the_four_fields_for_both_impls(tmp_path, tiny_model_dir, pairs_file):
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench

    out = tmp_path / "bench.json"
    code = bench.main(["--model", str(tiny_model_dir), "--data", str(pairs_file),
                       "--micro-batch-size", "4", "--seq-len", "64", "--steps", "2",
                       "--impl", "both", "--device", "cpu", "--repeats", "2",
                       "--threads", "1", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    # Two pairs, alternating, each with the load before and after; threads as asked.
    pairs = result["pairs"]
    assert result["threads"] == pairs["threads"] == 1 and pairs["pairs"] == 2
    assert len(pairs["load_before_after"]) == 2 and len(pairs["ratios"]) == 2
    assert pairs["spread"][0] <= pairs["median_ratio"] <= pairs["spread"][1]
    # Counts of the first step: ops, and lm_head read twice (logits, dx) on each side.
    for impl in ("hf", "baton"):
        assert result[impl]["ops_first_step"] > 0
        assert result[impl]["lm_head_bytes_first_step"] > 0
    assert result["baton"]["ops_first_step"] <= result["hf"]["ops_first_step"]
    hf, baton = result["hf"], result["baton"]
    for top in (hf, baton):
        assert set(FIELDS) <= set(top) and top["oom"] is False
        assert top["tokens_per_s"] > 0 and top["peak_rss_bytes"] > 0
    runs = result["runs"]
    # The same samples in the same order: the same real tokens and (to rounding) losses.
    assert runs["hf"]["real_tokens"] == runs["baton"]["real_tokens"] > 0
    assert result["max_loss_diff"] < 1e-4
    # The pairs differ in length: HF's padded micro-batches compute padding, Baton's none.
    assert runs["baton"]["padding_free"] is True and baton["token_efficiency"] == 1.0
    assert runs["hf"]["computed_tokens"] > runs["hf"]["real_tokens"]
    assert hf["token_efficiency"] == runs["hf"]["real_tokens"] / runs["hf"]["computed_tokens"]
    assert 0 < baton["matmul_flops_per_token"] < hf["matmul_flops_per_token"]


def test_pair_summary_warns_when_the_load_exceeds_the_cores(monkeypatch):
    from baton.scripts import bench_load

    monkeypatch.setattr(bench_load, "cores", lambda: 2)
    pairs = [{"hf": {"tokens_per_s": 100.0}, "baton": {"tokens_per_s": r}}
             for r in (150.0, 180.0, 170.0)]
    quiet = bench_load.pair_summary(pairs, [(0.5, 1.2), (1.0, 1.9), (0.3, 0.8)], 2)
    assert quiet["median_ratio"] == pytest.approx(1.7) and quiet["spread"] == [1.5, 1.8]
    assert "warning" not in quiet and "WARNING" not in bench_load.summary_text(quiet)
    busy = bench_load.pair_summary(pairs, [(0.5, 1.2), (3.1, 4.0), (0.3, 0.8)], 2)
    assert busy["loaded_pairs"] == [1]
    assert "WARNING: load average above the 2 cores" in bench_load.summary_text(busy)
    monkeypatch.setattr(bench_load, "load_average", lambda: 1.4)
    assert bench_load.free_cores() == 1
    monkeypatch.setattr(bench_load, "load_average", lambda: 7.0)
    assert bench_load.free_cores() == 1  # never fewer than one


def test_a_model_folder_that_is_not_there_exits_2(tmp_path, pairs_file, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench

    out = tmp_path / "bench.json"
    code = bench.main(["--model", str(tmp_path / "missing"), "--data", str(pairs_file),
                       "--steps", "1", "--device", "cpu", "--json", str(out)])
    assert code == 2 and not out.exists()
    err = " ".join(capsys.readouterr().err.split())  # rich wraps lines
    assert "is not a folder; give a model folder written by save_pretrained" in err
    assert "build" not in err  # refused before any model is built
