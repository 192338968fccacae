"""Baton's top-level `kernels/` package and Hugging Face's `kernels` distribution share a name.

What happens (documented in DESIGN.md, "Kernels"): `python agent.py ...` and the scripts put
the repository root first on sys.path, so `import kernels` finds Baton's package even when HF's
`kernels` is installed. bitsandbytes (0.50) asks that name for `get_kernel` on CPUs with
AVX512-BF16, finds ours, and logs "Failed to load CPU gemm_4bit_forward from
kernels-community ..." before using its own CPU path; session/quiet.py drops exactly that
record at our entry points. These tests hold both halves: the one message is silenced (and
no other), and Baton still imports and trains with HF's `kernels` installed on the path.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.agent_helpers import agent_env, write_config
from tests.fixtures_tiny import pairs_records, write_jsonl
from tests.native_device import skip_on_cuda

# About a package name, not a kernel: one test pip-installs HF's `kernels` from PyPI (the GPU
# check runs offline) and trains on the CPU's reference path, the others are CPU entry points.
pytestmark = skip_on_cuda("the package name is checked on the CPU; it needs the network")

ROOT = Path(__file__).resolve().parent.parent
HF_KERNELS = "kernels==0.17.2"
NOTICE = ("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
          "already `pip install kernels` and the kernels >= 0.11.1")  # bitsandbytes' own words


def emit_after(entry: str) -> subprocess.CompletedProcess:
    """Run an entry point in a fresh interpreter, then log bitsandbytes' notice (and one other
    warning) on its logger, as bitsandbytes does on an AVX512-BF16 CPU; this CPU may lack it."""
    code = (f"import logging, sys; sys.path.insert(0, {str(ROOT)!r})\n{entry}\n"
            "log = logging.getLogger('bitsandbytes.backends.cpu.ops')\n"
            f"log.warning({NOTICE!r}, ImportError('no get_kernel'))\n"
            "log.warning('another bitsandbytes warning')\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=agent_env())


def test_only_the_kernels_community_notice_is_dropped():
    from session.quiet import BNB_LOGGER, DropBnbKernelNotice, silence_bnb_kernel_notice

    silence_bnb_kernel_notice()
    silence_bnb_kernel_notice()  # idempotent
    logger = logging.getLogger(BNB_LOGGER)
    assert sum(isinstance(f, DropBnbKernelNotice) for f in logger.filters) == 1
    make = lambda msg: logging.LogRecord(BNB_LOGGER, logging.WARNING, "ops.py", 1, msg,  # noqa
                                         ("x",), None)
    assert not logger.filter(make(NOTICE))
    assert logger.filter(make("Failed to load something else: %s"))


def test_plan_prints_no_kernels_community_line(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", pairs_records(8))
    config = write_config(tmp_path, model_dir=tiny_model_dir, train_file=data,
                          store=str(tmp_path / "store"), model={"load_in_4bit": True})
    done = emit_after(f"import agent; assert agent.main(['plan', '--config', {str(config)!r}]) "
                      "== 0")
    assert done.returncode == 0, done.stderr
    assert "gemm_4bit_forward" not in done.stdout + done.stderr
    assert "another bitsandbytes warning" in done.stderr  # the filter is that narrow


def test_merge_prints_no_kernels_community_line(tmp_path):
    done = emit_after("from scripts.merge import main\n"
                      f"main(['--store', {str(tmp_path / 'none')!r}, '--run', 'x', '--out', "
                      f"{str(tmp_path / 'out')!r}])")
    assert "gemm_4bit_forward" not in done.stdout + done.stderr
    assert "another bitsandbytes warning" in done.stderr


@pytest.fixture(scope="session")
def hf_kernels_dir() -> Path:
    """HF's `kernels` from PyPI, `pip install --target` into a cached folder (no deps: the
    venv already has what it imports); once per machine."""
    root = Path.home() / ".cache" / "baton" / "test-deps" / HF_KERNELS.replace("==", "-")
    if not (root / ".complete").is_file():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        "--disable-pip-version-check", "--target", str(root), "--upgrade",
                        HF_KERNELS], check=True, timeout=300)
        (root / ".complete").write_text(HF_KERNELS)
    return root


@pytest.mark.slow
def test_baton_imports_and_trains_with_hf_kernels_on_the_path(tiny_model_dir, tmp_path,
                                                              hf_kernels_dir):
    env = agent_env(PYTHONPATH=str(hf_kernels_dir))
    probe = subprocess.run(
        [sys.executable, "-c", "import kernels, json; print(json.dumps(kernels.__file__))"],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
    assert json.loads(probe.stdout).startswith(str(hf_kernels_dir))  # HF's, outside the repo
    data = write_jsonl(tmp_path / "d.jsonl", pairs_records(8))
    config = write_config(tmp_path, model_dir=tiny_model_dir, train_file=data,
                          store=str(tmp_path / "store"), model={"load_in_4bit": True},
                          train={"max_steps": 2})
    run = subprocess.run([sys.executable, str(ROOT / "agent.py"), "run", "--config", str(config),
                          "--workdir", str(tmp_path / "w"), "--log-every", "0"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "kernels reference" in run.stdout  # Baton's own kernels patched the model
    assert "gemm_4bit_forward" not in run.stdout + run.stderr
    # From the repository root too, as `python agent.py` in a notebook cell: ours wins there.
    ours = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.__file__)"],
                          capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    assert ours.stdout.strip() == str(ROOT / "kernels" / "__init__.py")
