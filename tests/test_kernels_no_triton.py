"""The reference path needs no Triton: every kernel module imports, and a CPU run trains.

A fresh interpreter gets a `triton` package on PYTHONPATH whose import raises ImportError
(a broken or foreign install: `find_spec` finds it, `import` fails), which is the harder case
than a missing one. Nothing is mocked beyond that: the real trainer loads the tiny model in
NF4, patches it and takes optimizer steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.fixtures_tiny import make_spec
from tests.native_device import skip_on_cuda

pytestmark = skip_on_cuda("trains on the CPU with an unimportable triton, by design")

ROOT = Path(__file__).resolve().parent.parent
KERNEL_MODULES = ["dispatch", "architectures", "cross_entropy", "nf4", "rmsnorm", "rope",
                  "swiglu", "lora", "lora_patch", "patch", "guard"]

_CHILD = r'''
import importlib, json, os, sys
sys.path.insert(0, os.getcwd())
modules = json.loads(sys.argv[1])
for name in modules:
    importlib.import_module("baton.kernels." + name)
from baton.kernels import dispatch
from baton.kernels._triton import HAS_TRITON, TritonMissingError
import torch
from baton.kernels.swiglu import swiglu_fwd
try:
    swiglu_fwd(torch.ones(4), torch.ones(4))
    launch = "launched"
except TritonMissingError as exc:
    launch = str(exc)
os.environ["BATON_KERNELS"] = "triton"
try:
    dispatch.select_backend("cpu")
    forced = "accepted"
except dispatch.KernelChoiceError as exc:
    forced = str(exc)
del os.environ["BATON_KERNELS"]

from baton.state_schema import RunSpec
from tests.fixtures_tiny import make_trainer
spec = RunSpec.model_validate_json(open(sys.argv[2]).read())
trainer = make_trainer(spec, sys.argv[3], kernels="auto")
losses = [trainer.train_step().loss for _ in range(spec.train.max_steps)]
print("RESULT " + json.dumps({
    "has_triton": HAS_TRITON, "available": dispatch.triton_available(),
    "auto_cpu": dispatch.select_backend("cpu"), "launch": launch, "forced": forced,
    "kernels": trainer.device_info.kernels, "step": trainer.cursor.step, "losses": losses,
    "triton_modules": sorted(m for m in sys.modules if m.split(".")[0] == "triton"
                             and sys.modules[m] is not None),
}))
'''


def test_cpu_training_finishes_on_the_reference_path_with_triton_unimportable(
        tmp_path, tiny_model_dir, pairs_file):
    blocked = tmp_path / "blocked" / "triton"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text('raise ImportError("triton is blocked for this test")\n')
    spec = make_spec(tiny_model_dir, pairs_file, max_steps=2)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec.model_dump_json())
    env = {k: v for k, v in os.environ.items() if k != "BATON_KERNELS"}
    # The interpreter flag on, as on a developer's machine: a launcher then gets past the
    # CPU-tensor check, as it would on a CUDA tensor, and must fail on the missing Triton.
    env.update(PYTHONPATH=str(blocked.parent), TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(KERNEL_MODULES), str(spec_file),
         str(pairs_file)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    got = json.loads(line[len("RESULT "):])
    assert got["has_triton"] is False and got["available"] is False
    assert got["auto_cpu"] == "reference" and got["kernels"] == "reference"
    assert got["step"] == 2 and len(got["losses"]) == 2
    assert all(0.0 < loss < 20.0 for loss in got["losses"]), got["losses"]
    assert got["triton_modules"] == []  # nothing imported a real Triton behind our back
    # A Triton launcher called anyway, and BATON_KERNELS=triton, say what to do.
    assert "needs the triton package" in got["launch"]
    assert "BATON_KERNELS=reference" in got["launch"]
    assert "triton package does not import here" in got["forced"]
