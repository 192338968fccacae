#!/usr/bin/env python
"""The wheels the GPU check carries to an image that lacks them, and their offline install.

    python scripts/gpu_wheels.py download [--python-version 3.12] [--dest .whl]   # make gpu-wheels

A GPU machine of the check has no network, and its image has torch, triton, transformers and
peft but not bitsandbytes, pydantic or tenacity (the agent imports the last two before
anything else). `scripts/gpu_wheels.txt` pins what is missing, dependencies included (no
resolver runs offline: each wheel's own requirements are listed there, and checked after the
install). `download` fetches them for linux x86_64 and one CPython (3.12, the image's, by
default) with pip, never installing them, and refuses a set over 60 MiB (the working tree
that reaches the machine holds 64 MiB in all). `install_missing` (called by gpu_check.py)
installs, from that folder alone (`pip install --no-index`), each pinned distribution that is
absent or older than its pin: into the site-packages when it is writable, else into a folder
put first on sys.path and PYTHONPATH, so the check's subprocesses see it too.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as metadata
import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Optional

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PINS_FILE = ROOT / "scripts" / "gpu_wheels.txt"
LIMIT_MIB = 60
# pip matches manylinux tags exactly: the ones these wheels carry (bitsandbytes: 2_24).
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
FILL = "make gpu-wheels"  # what to run, on a machine with internet, when wheels are missing


class WheelsError(Exception):
    """A wheel set that cannot be made or installed; the message says what to do."""


def pins(path: Path = PINS_FILE) -> list[tuple[str, str]]:
    """(name, version) of every `name==version` line of the pin file."""
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out.append((name.strip(), version.strip()))
    return out


def download(dest: Path, python_version: str = "3.12") -> list[Path]:
    """pip-download every pinned wheel for linux x86_64 and `python_version`; sizes checked."""
    dest.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--python-version", python_version,
            "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        args += ["--platform", platform]
    args += [f"{name}=={version}" for name, version in pins()]
    if subprocess.run(args).returncode != 0:
        raise WheelsError("pip download failed (above); it needs PyPI, and each pin a wheel for "
                          f"CPython {python_version} on linux x86_64")
    files = [wheel_for(dest, name, version) for name, version in pins()]
    absent = [f"{n}=={v}" for (n, v), f in zip(pins(), files) if f is None]
    if absent:
        raise WheelsError(f"pip download left no wheel for {', '.join(absent)}")
    total = sum(f.stat().st_size for f in files)
    if total > LIMIT_MIB * 2**20:
        raise WheelsError(f"the wheels hold {total / 2**20:.1f} MiB, over the {LIMIT_MIB} MiB "
                          "the working tree can carry; drop a pin or carry fewer files")
    return files


def wheel_for(folder: Path, name: str, version: str) -> Optional[Path]:
    """The wheel of `name==version` in `folder` (wheel file names use `_` for `-`)."""
    stem = f"{canonicalize_name(name).replace('-', '_')}-{version}-"
    found = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(stem))
    return found[0] if found else None


def installed_version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def needed() -> list[tuple[str, str]]:
    """The pins whose distribution is absent here or older than the pin."""
    out = []
    for name, version in pins():
        have = installed_version(name)
        if have is None or Version(have) < Version(version):
            out.append((name, version))
    return out


def unsatisfied() -> list[str]:
    """Requirements of the pinned distributions that nothing installed here meets."""
    problems = []
    for name, _ in pins():
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            problems.append(f"{name} is not installed")
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            have = installed_version(req.name)
            if have is None or not req.specifier.contains(have, prereleases=True):
                problems.append(f"{name} needs {req}, found {have or 'nothing'}")
    return problems


def _site_writable() -> bool:
    return os.access(sysconfig.get_paths()["purelib"], os.W_OK)


def install_missing(wheels: Path, target: Path, log: Path) -> dict:
    """Install the needed pins from `wheels` alone; a dict of what was done, for the report."""
    todo = needed()
    if not todo:
        return {"installed": [], "unsatisfied": unsatisfied()}
    files = [wheel_for(wheels, name, version) for name, version in todo]
    absent = [f"{n}=={v}" for (n, v), f in zip(todo, files) if f is None]
    if absent:
        raise WheelsError(f"{wheels} holds no wheel for {', '.join(absent)}; on a machine with "
                          f"internet run `{FILL}` and carry .whl with the working tree")
    args = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
            "--disable-pip-version-check", "--no-cache-dir", "--find-links", str(wheels)]
    into_target = not _site_writable()
    if into_target:
        args += ["--target", str(target), "--upgrade"]
    with log.open("w") as handle:
        handle.write("$ " + " ".join(args) + "\n")
        handle.flush()
        done = subprocess.run(args + [str(f) for f in files], stdout=handle,
                              stderr=subprocess.STDOUT, timeout=300)
    if done.returncode != 0:
        raise WheelsError(f"pip could not install the wheels offline; see {log}")
    if into_target:
        sys.path.insert(0, str(target))
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(target), os.environ.get("PYTHONPATH", "")) if p)
    importlib.invalidate_caches()
    return {"installed": [f.name for f in files], "target": str(target) if into_target else None,
            "unsatisfied": unsatisfied()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help="fetch the pinned wheels (needs PyPI)")
    d.add_argument("--python-version", default="3.12", help="CPython of the GPU image")
    d.add_argument("--dest", type=Path, default=ROOT / ".whl")
    args = p.parse_args(argv)
    try:
        files = download(args.dest, args.python_version)
    except WheelsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    total = sum(f.stat().st_size for f in files)
    for f in files:
        print(f"{f.stat().st_size / 2**20:8.2f} MiB  {f.name}")
    print(f"{total / 2**20:8.2f} MiB in all (limit {LIMIT_MIB} MiB) in {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
