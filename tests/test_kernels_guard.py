"""The device guard: every Triton launcher runs with its tensors' own GPU current.

No GPU is needed: the inputs are fake tensors on cuda:1 (FakeTensorMode makes them without a
device), and `torch.cuda.device` is replaced by a recorder. A recorder that raises on entry
stops each launcher before it reaches Triton, so what it saw is the device the launch would
have had.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported; gpu_check sets 0

import pytest  # noqa: E402
import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from baton.kernels import cross_entropy, guard, nf4, rmsnorm, rope, swiglu  # noqa: E402

KERNELS = Path(__file__).resolve().parent.parent / "kernels"


class _Stop(Exception):
    pass


class _Recorder:
    """Stands in for `torch.cuda.device`: notes the device it is entered with."""

    entered: list[torch.device] = []
    exited = 0
    stop = True

    def __init__(self, device):
        self.device = torch.device(device)

    def __enter__(self):
        _Recorder.entered.append(self.device)
        if _Recorder.stop:
            raise _Stop
        return self

    def __exit__(self, *exc):
        _Recorder.exited += 1
        return False


@pytest.fixture
def recorder(monkeypatch):
    _Recorder.entered, _Recorder.exited, _Recorder.stop = [], 0, True
    monkeypatch.setattr(torch.cuda, "device", _Recorder)
    return _Recorder


def _launches():
    """(name, call) for every launcher, each given fake inputs on cuda:1."""
    dev = "cuda:1"
    x = torch.empty(4, 2, 8, 16, device=dev)
    rows = torch.empty(6, 32, device=dev)
    cs = torch.empty(1, 8, 16, device=dev)
    w = torch.empty(32, device=dev)
    rstd = torch.empty(6, device=dev)
    labels = torch.zeros(6, dtype=torch.long, device=dev)
    packed = torch.empty(64, 1, dtype=torch.uint8, device=dev)
    return [
        ("ce_grad_triton", lambda: cross_entropy.ce_grad_triton(rows, labels, 1.0)),
        ("dequantize_nf4", lambda: nf4.dequantize_nf4(packed, None, torch.float16)),
        ("rmsnorm_fwd", lambda: rmsnorm.rmsnorm_fwd(rows, w, 1e-6)),
        ("rmsnorm_bwd", lambda: rmsnorm.rmsnorm_bwd(rows, rows, w, rstd)),
        ("rope_fwd", lambda: rope.rope_fwd(x, cs, cs)),
        ("rope_bwd", lambda: rope.rope_bwd(x, cs, cs)),
        ("swiglu_fwd", lambda: swiglu.swiglu_fwd(rows, rows)),
        ("swiglu_bwd", lambda: swiglu.swiglu_bwd(rows, rows, rows)),
    ]


def test_every_launcher_enters_its_tensors_device(recorder):
    with FakeTensorMode():
        launches = _launches()
        for name, call in launches:
            before = len(recorder.entered)
            with pytest.raises(_Stop):
                call()
            assert recorder.entered[before:] == [torch.device("cuda:1")], name


def test_the_guard_wraps_the_launch_and_leaves_cpu_tensors_alone(recorder):
    recorder.stop = False
    ran_under: list[int] = []

    @guard.on_tensor_device
    def launcher(scale, *, x):
        ran_under.append(len(recorder.entered) - recorder.exited)  # guards open right now
        return scale

    with FakeTensorMode():
        assert launcher(2.0, x=torch.empty(3, device="cuda:3")) == 2.0  # a keyword tensor
    assert recorder.entered == [torch.device("cuda:3")] and recorder.exited == 1
    assert ran_under == [1]
    assert launcher(1.0, x=torch.empty(3, device="cpu")) == 1.0  # the interpreter: no guard
    assert recorder.entered == [torch.device("cuda:3")] and ran_under == [1, 0]


def _launching_functions(tree: ast.Module):
    """Functions whose body launches a Triton kernel: a call of `name[grid](...)`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            for inner in ast.walk(node):
                if (isinstance(inner, ast.Call) and isinstance(inner.func, ast.Subscript)
                        and isinstance(inner.func.value, ast.Name)
                        and inner.func.value.id.endswith("_kernel")):
                    yield node
                    break


def test_no_launcher_in_kernels_is_left_unguarded():
    found = []
    for path in sorted(KERNELS.glob("*.py")):
        for fn in _launching_functions(ast.parse(path.read_text())):
            names = {d.id for d in fn.decorator_list if isinstance(d, ast.Name)}
            found.append(fn.name)
            assert "on_tensor_device" in names, f"{path.name}:{fn.name} launches unguarded"
    # Six launching functions in five modules today; a new one must carry the guard too.
    assert len(found) >= 6, found
