"""scripts/gpu_check.py: end to end on the CPU (--dry-run), its plan by GPU, its deadline.

The dry run is the same code a GPU runs, with the tiny preset, the Triton interpreter for one
kernel test file, the reference path elsewhere and CPU autocast for fp16 and bf16.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402
from tests.native_device import OnDevice  # noqa: E402


@pytest.mark.slow
def test_dry_run_runs_every_part_on_the_cpu(tmp_path):
    out = tmp_path / "check"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), str(out),
                           "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    parts = {p["name"]: p for p in report["parts"]}
    assert list(parts) == ["bitsandbytes", "kernel_tests", "nf4_bench", "handoff",
                           "bench_tiny_fp16", "bench_tiny_bf16"]
    assert report["ok"] and report["environment"]["dry_run"] is True
    assert all(p["status"] == "ok" for p in parts.values()), parts
    assert parts["kernel_tests"]["details"]["counts"]["passed"] > 0
    assert parts["nf4_bench"]["details"]["max_abs_diff"] == 0.0
    sessions = parts["handoff"]["details"]["sessions"]
    assert [s["precision"] for s in sessions] == ["fp16", "bf16"]
    assert sessions[0]["end_step"] == sessions[1]["start_step"] > 0
    assert parts["handoff"]["details"]["lr_checked_steps"] >= 6
    for precision in ("fp16", "bf16"):
        bench = parts[f"bench_tiny_{precision}"]["details"]
        assert bench["precision"] == precision and set(bench["runs"]) == {"hf", "baton"}
        assert bench["max_loss_diff"] < 1e-2  # the same model and data, two kernel paths
    table = (out / "gpu_check.md").read_text()
    assert "| handoff | ok |" in table and "dry run on the CPU" in table
    assert report["seconds"] <= seconds


def test_plan_skips_what_the_gpu_cannot_run(tmp_path):
    def plan_for(capability):
        check = gpu_check.Check(tmp_path, False, tmp_path, capability)
        return {p.name: p.skip for p in gpu_check.plan(check)}

    p100 = plan_for((6, 0))
    assert "sm_75" in p100["kernel_tests"] and "sm_75" in p100["nf4_bench"]
    assert "sm_80" in p100["bench_llama-3.1-8b_bf16"]
    t4 = plan_for((7, 5))
    assert t4["kernel_tests"] is None and t4["bench_qwen2.5-1.5b_fp16"] is None
    assert "sm_80" in t4["bench_qwen2.5-1.5b_bf16"]
    h100 = plan_for((9, 0))
    assert all(why is None for why in h100.values()), h100
    assert {"bench_qwen2.5-1.5b_fp16", "bench_qwen2.5-1.5b_bf16", "bench_llama-3.1-8b_fp16",
            "bench_llama-3.1-8b_bf16", "handoff", "nf4_bench"} <= set(h100)


def test_parts_that_cannot_finish_in_time_are_cut_or_not_started(tmp_path):
    check = gpu_check.Check(tmp_path, True, tmp_path, None)

    def quick(check, allowed):
        return {"allowed": allowed}

    def slow(check, allowed):
        check.command("slow", [sys.executable, "-c", "import time; time.sleep(30)"], allowed)
        return {}

    parts = [gpu_check.Part("quick", 5, quick), gpu_check.Part("slow", 60, slow),
             gpu_check.Part("late", 5, quick), gpu_check.Part("unfit", 5, quick, "no GPU")]
    outcomes = gpu_check.run_parts(check, parts, budget_s=gpu_check.MIN_START_S + 3)
    got = {o.name: o for o in outcomes}
    assert got["quick"].status == "ok" and got["quick"].details["allowed"] <= 5
    assert got["slow"].status == "timed_out" and got["slow"].seconds < 25
    assert got["late"].status == "skipped" and "not started" in got["late"].note
    assert got["unfit"].status == "skipped" and got["unfit"].note == "no GPU"
    gpu_check.write_report(tmp_path, {"dry_run": True}, outcomes, 1.0)
    assert "| slow | timed_out |" in (tmp_path / "gpu_check.md").read_text()


def test_missing_bitsandbytes_without_a_wheel_says_how_to_get_one(tmp_path, monkeypatch):
    # A module set to None in sys.modules is how Python itself marks one as not importable.
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    check = gpu_check.Check(tmp_path, True, tmp_path / "empty", None)
    with pytest.raises(gpu_check.PartFailed, match=r"pip download bitsandbytes==0\.50\.2"):
        gpu_check.ensure_bitsandbytes(check, 10)


def test_native_device_plugin_makes_test_tensors_on_the_device_with_the_same_values():
    gen = torch.Generator().manual_seed(0)
    want = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    with OnDevice("meta"):
        drawn = torch.randn(3, 4, generator=gen)  # drawn on the CPU, then moved
        made = torch.zeros(2)
        pinned = torch.ones(2, device="cpu")  # an explicit device is kept
        leaf = torch.randn(2, generator=gen, requires_grad=True)
    assert drawn.device.type == made.device.type == leaf.device.type == "meta"
    assert pinned.device.type == "cpu" and leaf.requires_grad and leaf.is_leaf
    with OnDevice("cpu"):
        torch.testing.assert_close(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)),
                                   want)
