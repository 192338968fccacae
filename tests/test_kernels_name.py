"""Baton's `kernels/` folder and Hugging Face's `kernels` distribution share a name.

transformers 5.25 requires HF's `kernels` and imports it during `import transformers`;
bitsandbytes asks it for `get_kernel`. `python agent.py ...` puts the repository root first on
sys.path, so the folder must never be importable as `kernels`: it has no `__init__.py`, and
Baton imports it as `baton.kernels` (baton/__init__.py; DESIGN.md, "Import names"). These tests
hold that from the root, as a notebook cell runs it; that no other folder name is a top-level
name of an installed distribution; and that bitsandbytes' one notice about the Hub kernel it
cannot fetch offline is silenced at our entry points (and no other message).
The fresh-venv check (scripts/fresh_install.sh, in .ci/run) runs a whole session with the
newest releases, with HF's `kernels` and without it.
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
from tests.fixtures_tiny import make_trainer, pairs_records, write_jsonl
from tests.native_device import skip_on_cuda

# About package names, not kernels: CPU entry points.
pytestmark = skip_on_cuda("the package names are checked on the CPU")

ROOT = Path(__file__).resolve().parent.parent
# Our folders, as a user's checkout has them at the top of sys.path.
FOLDERS = ("kernels", "training", "session", "handoff", "state_schema", "export", "scripts",
           "tests")
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
    from baton.session.quiet import BNB_LOGGER, DropBnbKernelNotice, silence_bnb_kernel_notice

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
    done = emit_after("from baton.scripts.merge import main\n"
                      f"main(['--store', {str(tmp_path / 'none')!r}, '--run', 'x', '--out', "
                      f"{str(tmp_path / 'out')!r}])")
    assert "gemm_4bit_forward" not in done.stdout + done.stderr
    assert "another bitsandbytes warning" in done.stderr


def test_from_the_root_kernels_is_hf_and_baton_kernels_is_ours():
    """As `python agent.py` runs: the root leads sys.path, yet `kernels` is HF's package,
    transformers' hub-kernel integration imports, and `baton.kernels` is this folder."""
    code = ("import sys, json; sys.path.insert(0, '.')\n"
            "import kernels, transformers.integrations.hub_kernels as hk\n"
            "import baton.kernels.rmsnorm as ours\n"
            "print(json.dumps([kernels.__file__, hasattr(kernels, 'get_kernel'), ours.__file__,"
            " hk.__name__]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=agent_env())
    assert done.returncode == 0, done.stderr
    hf_file, has_get_kernel, ours, _ = json.loads(done.stdout.splitlines()[-1])
    assert "site-packages" in hf_file and not hf_file.startswith(str(ROOT / "kernels"))
    assert has_get_kernel
    assert ours == str(ROOT / "kernels" / "rmsnorm.py")


def test_the_kernels_folder_cannot_hide_a_package():
    """A folder without __init__.py is at most a namespace portion, which any installed
    package of the same name outranks; with one, it would shadow HF's `kernels`."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "baton" / "__init__.py").is_file()


def test_no_installed_distribution_claims_our_names():
    """Each folder name, `agent` and `baton`, against the top-level names of every installed
    distribution (the requirements and their own dependencies). `kernels` is HF's by design;
    any other hit is a package that our checkout would shadow, or that would shadow ours."""
    from importlib.metadata import packages_distributions

    claimed = packages_distributions()
    clashes = {name: claimed[name] for name in FOLDERS + ("agent", "baton") if name in claimed}
    assert clashes.pop("kernels", None) == ["kernels"]
    assert not clashes, f"top-level names also installed by: {clashes}"


def test_models_baton_loads_keep_transformers_plain_modules(tiny_model_dir, tmp_path):
    """transformers 5.25 kernelizes every loaded model by default (Hub kernels swapped into
    the layers; no load at all without HF's `kernels`). Baton's load asks for the plain
    modules, which its own patching replaces: the model it trains is not kernelized."""
    from transformers import AutoModelForCausalLM

    from baton.training.model import PLAIN_MODULES
    from tests.fixtures_tiny import make_spec

    default = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert default.use_kernels  # what transformers does unasked, and why PLAIN_MODULES exists
    trainer = make_trainer(make_spec(tiny_model_dir, write_jsonl(tmp_path / "d.jsonl",
                                                                 pairs_records(4))),
                           tmp_path / "d.jsonl")
    assert PLAIN_MODULES == {"use_kernels": False}
    assert not trainer.model.get_base_model().use_kernels
