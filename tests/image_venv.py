"""A virtual environment shaped like the GPU image, and wheels for what it lacks, both cheap.

The GPU image (issue 16; the device README's package list, read 2026-11-17) has torch,
triton, transformers, peft, accelerate, huggingface_hub, safetensors, pyarrow, rich, pytest,
numpy, pyyaml and about 170 others, but not bitsandbytes, pydantic or tenacity.
`image_venv(dest)` makes a venv (no pip install, no copy: `--without-pip`) whose one `.pth`
line exposes a folder of symbolic links to exactly those of the shared venv's distributions
that the image also has; everything else (bitsandbytes, pydantic, tenacity, boto3,
apprise...) is absent, as on the image. Installing into it writes to its own site-packages.

`local_wheels(dest)` builds the wheels of `scripts/gpu_wheels.txt` for THIS Python from the
shared venv's installed files (each distribution's RECORD, repacked as a wheel with its own
WHEEL tags and a fresh RECORD): the same bytes pip installed here, offline, in seconds, and
without fetching 43 MiB of bitsandbytes from PyPI in every CI run. `make gpu-wheels` itself
(pip download for CPython 3.12) is what a GPU run carries.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as metadata
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from baton.scripts.gpu_wheels import pins

# The image's distributions (KINDS.md, "Python packages already there"). The venv exposes
# these and what its own versions of them require (huggingface_hub 2.4 imports httpx2, where
# the image's 1.33 has httpx), never a pinned wheel of scripts/gpu_wheels.txt.
IMAGE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer click cloudpickle cmake colorama contourpy coverage
cycler cython einops filelock flatbuffers fonttools fsspec h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig jinja2 joblib kiwisolver lxml
markdown markdown-it-py markupsafe matplotlib mdurl mpmath msgpack multidict networkx ninja
numpy packaging pandas pathspec peft pillow pip pluggy portalocker propcache protobuf psutil
pyarrow pygments pyparsing pyproject-hooks pytest pytest-timeout python-dateutil pyyaml regex
requests rich safetensors scipy sentencepiece setuptools shellingham six sympy tabulate tokenizers
torch tqdm transformers triton typer typing-extensions urllib3 wheel wrapt xxhash yarl zipp
""".split()


def _site() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def _top_levels(dist: metadata.Distribution) -> set[str]:
    """The site-packages entries a distribution owns: its files' first path components."""
    tops = set()
    for f in dist.files or []:
        first = f.parts[0]
        if first not in ("..", "__pycache__") and not first.endswith(".pth"):
            tops.add(first)
    return tops


def _exposed(site: Path) -> dict[str, metadata.Distribution]:
    """The image's distributions installed here, with their installed requirements, less
    the pinned wheels the image lacks (those the check must install)."""
    installed = {canonicalize_name(d.metadata["Name"]): d
                 for d in metadata.distributions(path=[str(site)])}
    todo = [canonicalize_name(n) for n in IMAGE]
    pinned = {canonicalize_name(n) for n, _ in pins()} - set(todo)
    exposed: dict[str, metadata.Distribution] = {}
    while todo:
        name = todo.pop()
        if name in exposed or name in pinned or name not in installed:
            continue
        exposed[name] = installed[name]
        for line in installed[name].requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return exposed


def image_venv(dest: Path) -> Path:
    """A venv at `dest` seeing only the image's distributions; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True,
                   timeout=120)
    view = dest / "image-site"
    view.mkdir()
    site = _site()
    for dist in _exposed(site).values():
        for top in _top_levels(dist):
            if (site / top).exists() and not (view / top).exists():
                (view / top).symlink_to(site / top)
    python = dest / "bin" / "python"
    own_site = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip())
    (own_site / "image.pth").write_text(str(view) + "\n")
    return python


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _wheel_name(dist: metadata.Distribution) -> str:
    tags = [line.split(":", 1)[1].strip() for line in (dist.read_text("WHEEL") or "").splitlines()
            if line.startswith("Tag:")]
    parts = [t.split("-") for t in tags]
    joined = "-".join(".".join(sorted({p[i] for p in parts})) for i in range(3))
    name = canonicalize_name(dist.metadata["Name"]).replace("-", "_")
    return f"{name}-{dist.version}-{joined}.whl"


def repack(dist: metadata.Distribution, out: Path) -> Path:
    """A wheel of an installed distribution, from its RECORD (stored, not compressed)."""
    site = _site()
    wheel = out / _wheel_name(dist)
    info = f"{canonicalize_name(dist.metadata['Name']).replace('-', '_')}-{dist.version}.dist-info"
    record = []
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as zf:
        for f in dist.files or []:
            rel = str(f)
            if rel.startswith("..") or "__pycache__" in f.parts or f.name in ("RECORD",
                                                                               "INSTALLER"):
                continue
            path = site / rel
            if path.is_file():
                data = path.read_bytes()
                zf.writestr(rel, data)
                record.append(_record_line(rel, data))
        zf.writestr(f"{info}/RECORD", "\n".join(record + [f"{info}/RECORD,,"]) + "\n")
    return wheel


def local_wheels(dest: Path) -> Path:
    """The pinned wheels for this Python, built once into `dest` (a cache folder)."""
    marker = dest / ".complete"
    if marker.is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    for name, version in pins():
        dist = metadata.distribution(name)
        if dist.version != version:
            raise RuntimeError(f"{name} {dist.version} is installed, the pin says {version}: "
                               "keep scripts/gpu_wheels.txt and requirements-dev.txt together")
        repack(dist, dest)
    marker.write_text("\n".join(f"{n}=={v}" for n, v in pins()))
    return dest
