"""Labelled records from real text that ships with Python: a docstring -> the stdlib package
it documents. The classification demo and tests train on them (no download, the same records
on every machine with the same Python).

    python scripts/classify_data.py OUT.jsonl [--per-class N] [--csv]

Each record is {"text": the docstring's first paragraph, "label": the package}. Docstrings
that repeat, or that name their own package, are left out (the answer would be in the
question), so the classifier has to learn what each package is about.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import inspect
import json
import random
from pathlib import Path
from typing import Optional

# Packages whose docstrings talk about clearly different things; all in every CPython.
PACKAGES = ("asyncio", "email", "http", "logging", "multiprocessing", "turtle", "unittest",
            "xml")


def _members(package: str) -> list:
    """The package and its submodules' public functions, classes and methods."""
    import pkgutil

    root = importlib.import_module(package)
    modules = [root]
    for info in pkgutil.walk_packages(getattr(root, "__path__", []), package + "."):
        if ".test" in info.name or "__main__" in info.name or "idle" in info.name:
            continue
        try:
            modules.append(importlib.import_module(info.name))
        except Exception:  # noqa: BLE001 - a submodule this platform cannot import is skipped
            continue
    found = []
    for module in modules:
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            found.append(obj)
            if inspect.isclass(obj):
                found += [m for n, m in vars(obj).items()
                          if not n.startswith("_") and inspect.isfunction(m)]
    return found


def first_paragraph(doc: str, limit: int = 300) -> str:
    text = inspect.cleandoc(doc).split("\n\n", 1)[0]
    return " ".join(text.split())[:limit]


def package_records(package: str) -> list[dict]:
    seen, out = set(), []
    for obj in _members(package):
        doc = inspect.getdoc(obj)
        if not doc:
            continue
        text = first_paragraph(doc)
        if len(text) < 20 or text in seen or package in text.lower():
            continue
        seen.add(text)
        out.append({"text": text, "label": package})
    return out


def records(per_class: int = 40, packages: tuple[str, ...] = PACKAGES,
            seed: int = 0) -> list[dict]:
    """`per_class` records of each package (fewer where a package has fewer), shuffled."""
    rnd = random.Random(seed)
    out = []
    for package in packages:
        found = sorted(package_records(package), key=lambda r: r["text"])
        rnd.shuffle(found)
        out += found[:per_class]
    rnd.shuffle(out)
    return out


def write(path: Path, rows: list[dict], *, columns: Optional[dict[str, str]] = None) -> Path:
    """JSONL, or CSV by the suffix; `columns` renames the fields (e.g. text -> complaint)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = columns or {}
    rows = [{names.get(k, k): v for k, v in r.items()} for r in rows]
    if path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=40)
    args = parser.parse_args(argv)
    rows = records(args.per_class)
    print(f"{write(args.out, rows)}: {len(rows)} records, {len(PACKAGES)} labels")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
