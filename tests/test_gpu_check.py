"""scripts/gpu_check.py: end to end on the CPU (--dry-run) in a venv shaped like the GPU
image, its plan by GPU, its deadline, its verdicts, the wheels, a crashing test file.

The dry run is the same code a GPU runs, with the tiny preset, the Triton interpreter for one
kernel test file, the reference path elsewhere and CPU autocast for fp16 and bf16.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402
from baton.scripts import gpu_parts, gpu_wheels  # noqa: E402
from tests.image_venv import image_venv, local_wheels  # noqa: E402
from tests.native_device import OnDevice  # noqa: E402

WHEEL_CACHE = Path.home() / ".cache" / "baton" / "test-deps"


@pytest.fixture(scope="session")
def cpython_wheels() -> Path:
    """The pinned wheels for this Python, repacked from this venv once per machine."""
    key = hashlib.sha256(repr(gpu_wheels.pins()).encode()).hexdigest()[:12]
    return local_wheels(WHEEL_CACHE / f"gpu-wheels-py{sys.version_info[0]}{sys.version_info[1]}"
                        f"-{key}")


# The GPU image gets its transformers, peft and accelerate with the image, at whatever version
# it was built with: "newest" installs today's releases over the image venv's (PyPI, with
# their own dependencies: HF's `kernels` with transformers >= 5.25). It runs in the fresh-install
# step of .ci/run (scripts/fresh_install.sh sets BATON_IMAGE_NEWEST=1), not in `make test`.
NEWEST = ("transformers", "peft", "accelerate")
RELEASES = ["pinned", pytest.param("newest", marks=pytest.mark.skipif(
    not os.environ.get("BATON_IMAGE_NEWEST"), reason="needs PyPI; run by make fresh-check"))]


def install_newest(python: Path) -> dict[str, str]:
    """Today's transformers, peft and accelerate into the image venv's own site-packages
    (which lead its path, ahead of the image's view); their installed versions."""
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--upgrade", *NEWEST], check=True, timeout=900)
    code = "import importlib.metadata as m, json; print(json.dumps({n: m.version(n) for n in %r}))"
    done = subprocess.run([str(python), "-c", code % (NEWEST + ("kernels",),)],
                          capture_output=True, text=True, check=True)
    versions = json.loads(done.stdout)
    print("image venv, newest releases:", versions)
    return versions


@pytest.mark.slow
@pytest.mark.parametrize("releases", RELEASES)
def test_dry_run_in_an_image_venv_installs_the_wheels_offline_and_passes(tmp_path, releases,
                                                                         cpython_wheels):
    python = image_venv(tmp_path / "venv")
    lacking = subprocess.run([str(python), "-c", "import pydantic"], capture_output=True)
    assert lacking.returncode != 0  # the venv lacks what the image lacks
    versions = install_newest(python) if releases == "newest" else {}
    # What the wheels must bring: newest releases may pull some of it in (typer -> pydantic).
    lacking = [name for name in ("bitsandbytes", "pydantic", "tenacity")
               if subprocess.run([str(python), "-c", f"import {name}"],
                                 capture_output=True).returncode != 0]
    assert "bitsandbytes" in lacking and (releases == "newest" or len(lacking) == 3)
    out = tmp_path / "check"
    started = time.monotonic()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    proc = subprocess.run([str(python), str(ROOT / "scripts" / "gpu_check.py"), str(out),
                           "--dry-run", "--wheels", str(cpython_wheels)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=3000)
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    parts = {p["name"]: p for p in report["parts"]}
    assert list(parts) == ["wheels", "kernel_tests", "bench_tiny_fp16", "bench_tiny_bf16",
                           "nf4_fp16", "nf4_bf16", "handoff", "ranks", "sharded",
                           "reference"]
    assert report["ok"] and report["environment"]["dry_run"] is True
    assert all(p["verdict"] == "pass" for p in parts.values()), parts
    installed = " ".join(parts["wheels"]["details"]["installed"])
    assert all(n in installed for n in lacking)
    assert report["environment"]["bitsandbytes"] == "0.50.2"
    if versions:  # the check ran on the releases just installed
        assert report["environment"]["transformers"] == versions["transformers"]
    assert parts["kernel_tests"]["details"]["counts"]["passed"] > 0
    assert parts["nf4_bf16"]["details"]["max_abs_diff"] == 0.0
    handoff = parts["handoff"]["details"]
    assert [s["precision"] for s in handoff["sessions"]] == ["fp16", "bf16"]
    assert handoff["sessions"][0]["end_step"] == handoff["sessions"][1]["start_step"] > 0
    assert handoff["lr_checked_steps"] >= 6 and len(handoff["sample_checked_steps"]) >= 2
    for precision in ("fp16", "bf16"):
        bench = parts[f"bench_tiny_{precision}"]["details"]
        assert bench["precision"] == precision and set(bench["runs"]) == {"hf", "baton"}
        assert bench["max_loss_diff"] <= bench["tolerance"]
    assert parts["reference"]["details"]["kernels"] == "reference"
    shard = parts["sharded"]["details"]
    assert shard["max_loss_diff"] <= shard["tolerance"] and shard["steps"] >= 2
    table = (out / "gpu_check.md").read_text()
    assert "| handoff | pass |" in table and "dry run on the CPU" in table
    assert report["seconds"] <= seconds


def test_plan_leaves_out_what_the_gpu_cannot_run(tmp_path):
    def plan_for(capability):
        check = gpu_check.Check(tmp_path, False, tmp_path, capability)
        return {p.name: p.skip for p in gpu_check.plan(check)}, check

    p100, _ = plan_for((6, 0))
    assert "sm_75" in p100["kernel_tests"] and "sm_75" in p100["nf4_fp16"]
    assert "sm_80" in p100["bench_llama-3.1-8b_bf16"]
    assert p100["reference"] is None and p100["handoff"] is None
    t4, check = plan_for((7, 5))
    assert t4["kernel_tests"] is None and t4["bench_llama-3.1-8b_fp16"] is None
    assert "sm_80" in t4["bench_llama-3.1-8b_bf16"] and "sm_80" in t4["nf4_bf16"]
    assert not check.bf16  # so the handoff resumes in fp32, never bf16, on a T4
    h100, check = plan_for((9, 0))
    assert all(why is None for why in h100.values()) and check.bf16, h100
    budgets = sum(p.budget_s for p in gpu_check.plan(check))
    assert budgets <= gpu_check.DEADLINE_S  # the parts fit the deadline they are run under
    assert gpu_parts._kernel_path(check) == "triton"


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
    assert got["quick"].verdict == "pass" and got["quick"].details["allowed"] <= 5
    assert got["slow"].verdict == "fail" and got["slow"].seconds < 25
    assert "cut at its budget" in got["slow"].note
    assert got["late"].verdict == "not run" and "not started" in got["late"].note
    assert got["unfit"].verdict == "not run" and got["unfit"].note == "no GPU"
    gpu_check.write_report(tmp_path, {"dry_run": True}, outcomes, 1.0)
    assert "| slow | fail |" in (tmp_path / "gpu_check.md").read_text()


def test_a_test_file_that_aborts_is_a_failure_named_by_its_signal(tmp_path):
    # A Triton LLVM abort kills the pytest process: no summary, no report. It must count.
    (tmp_path / "test_aborts.py").write_text("import os\n\ndef test_a():\n    os.abort()\n")
    (tmp_path / "test_fine.py").write_text("def test_b():\n    assert True\n")
    check = gpu_check.Check(tmp_path / "out", True, tmp_path, None)
    with pytest.raises(gpu_parts.PartFailed) as info:
        gpu_parts.kernel_tests(check, 120, files=[str(tmp_path / "test_aborts.py"),
                                                 str(tmp_path / "test_fine.py")])
    aborted, fine = info.value.details["files"]
    assert aborted["crash"] == "killed by SIGABRT" and aborted["passed"] == 0
    assert fine["passed"] == 1 and "crash" not in fine
    assert "test_aborts.py (killed by SIGABRT)" in str(info.value)
    assert info.value.details["counts"]["passed"] == 1


def _bench(hf: dict, baton: dict, diff) -> dict:
    return {"runs": {"hf": hf, "baton": baton}, "max_loss_diff": diff}


def test_the_training_bench_is_judged_on_loss_and_memory():
    ok = {"losses": [12.6, 12.5], "tokens_per_s": 900.0, "kernels": "triton"}
    assert gpu_parts.judge_training(_bench(ok, ok, 3e-3), "bf16")["max_loss_diff"] == 3e-3
    cases = [(_bench(ok, {"oom": True, "error": "CUDA out of memory"}, None), "out of memory"),
             (_bench(ok, {"losses": [12.6, float("nan")]}, None), "not finite"),
             (_bench(ok, ok, 0.3), "over 0.05"), (_bench(ok, ok, None), "over 0.05")]
    for result, why in cases:
        with pytest.raises(gpu_parts.PartFailed, match=why):
            gpu_parts.judge_training(result, "bf16")
    hf_oom = gpu_parts.judge_training(_bench({"oom": True}, ok, None), "fp16")
    assert "not compared" in hf_oom["note"]


def test_wheel_pins_are_the_dev_pins_and_name_their_wheels(tmp_path):
    dev = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "requirements-dev.txt")
                          .read_text(), re.M))
    dev = {k.lower(): v for k, v in dev.items()}
    pinned = dict(gpu_wheels.pins())
    assert {"bitsandbytes", "pydantic", "tenacity"} <= set(pinned)
    for name, version in pinned.items():
        assert dev.get(name, version) == version, name
    (tmp_path / "pydantic_core-2.50.4-cp312-cp312-manylinux_2_17_x86_64.whl").write_bytes(b"")
    assert gpu_wheels.wheel_for(tmp_path, "pydantic-core", "2.50.4") is not None
    assert gpu_wheels.wheel_for(tmp_path, "pydantic-core", "2.50.3") is None


def test_a_missing_wheel_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_wheels, "needed", lambda: [("bitsandbytes", "0.50.2")])
    with pytest.raises(gpu_wheels.WheelsError, match=r"bitsandbytes==0\.50\.2.*make gpu-wheels"):
        gpu_wheels.install_missing(tmp_path / "empty", tmp_path / "site", tmp_path / "log")


def test_an_unwritable_site_gets_a_target_folder_on_the_path(tmp_path, monkeypatch,
                                                             cpython_wheels):
    monkeypatch.setattr(gpu_wheels, "needed", lambda: [("tenacity", "9.2.1")])
    monkeypatch.setattr(gpu_wheels, "_site_writable", lambda: False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    done = gpu_wheels.install_missing(cpython_wheels, tmp_path / "site", tmp_path / "log")
    assert done["target"] == str(tmp_path / "site") and done["unsatisfied"] == []
    assert (tmp_path / "site" / "tenacity" / "__init__.py").is_file()
    assert sys.path[0] == str(tmp_path / "site")
    assert os.environ["PYTHONPATH"] == f"{tmp_path / 'site'}{os.pathsep}/elsewhere"


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
