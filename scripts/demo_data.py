"""A small instruction dataset from real text that every machine has: Python's standard library.

Each record pairs a module-level function's docstring (the prompt) with the function's code
less that docstring (the completion), taken with `ast`. Files are read in sorted order and the
first `count` functions that pass the size filters are kept, so the output is the same bytes on
every run with the same Python version (the stdlib changes between Python versions).

    python scripts/demo_data.py OUT.jsonl [--count 400]
"""

from __future__ import annotations

import argparse
import ast
import json
import sysconfig
from pathlib import Path
from typing import Iterator, Optional

# Folders of the stdlib that are tests, demos or vendored code rather than library functions.
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo",
             "lib2to3", "__pycache__", "ensurepip", "venv"}
MIN_DOC, MAX_DOC = 30, 300  # characters of the docstring
MIN_CODE, MAX_CODE = 60, 800  # characters of the function without its docstring


def stdlib_files(root: Optional[Path] = None) -> list[Path]:
    """The stdlib's .py files in a fixed (sorted) order."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"Python's standard library folder {root} does not exist")
    files = [p for p in root.rglob("*.py")
             if not SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def function_pairs(path: Path, module: str) -> Iterator[dict[str, str]]:
    """prompt/completion records of the documented module-level functions of one file."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (UnicodeDecodeError, SyntaxError, ValueError):
        return  # a few stdlib files are templates or in another encoding: not training text
    lines = source.splitlines()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            record = _pair(node, lines, module)
            if record is not None:
                yield record


def _pair(node: ast.FunctionDef, lines: list[str], module: str) -> Optional[dict[str, str]]:
    doc = ast.get_docstring(node)
    if not doc or len(node.body) < 2 or not MIN_DOC <= len(doc) <= MAX_DOC:
        return None
    if node.name.startswith("_"):
        return None
    first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
    doc_node = node.body[0]
    kept = lines[first - 1:doc_node.lineno - 1] + lines[doc_node.end_lineno:node.end_lineno]
    code = "\n".join(kept).rstrip() + "\n"
    if not MIN_CODE <= len(code) <= MAX_CODE:
        return None
    prompt = (f"Write the Python function `{node.name}` of the `{module}` module.\n"
              f"Its docstring says:\n{doc.strip()}\n")
    return {"prompt": prompt, "completion": code}


def build_pairs(count: int = 400, root: Optional[Path] = None) -> list[dict[str, str]]:
    """The first `count` pairs in sorted-file order; fewer only if the stdlib has fewer."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    pairs: list[dict[str, str]] = []
    for path in stdlib_files(root):
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        for record in function_pairs(path, module):
            pairs.append(record)
            if len(pairs) >= count:
                return pairs
    return pairs


def write_jsonl(out: Path, count: int = 400, root: Optional[Path] = None, *,
                chat: bool = False) -> Path:
    """Write the dataset as JSONL: one {"prompt", "completion"} object a line, or with `chat`
    one {"messages": [user, assistant]} object."""
    pairs = build_pairs(count, root)
    if not pairs:
        raise ValueError(f"no documented functions found under {root or 'the stdlib'}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8", newline="\n") as fh:
        for record in pairs:
            shaped = as_chat(record) if chat else record
            fh.write(json.dumps(shaped, ensure_ascii=False, sort_keys=True) + "\n")
    return out


def as_chat(record: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    """A pair as a one-turn conversation, for models with a chat template."""
    return {"messages": [{"role": "user", "content": record["prompt"].strip()},
                         {"role": "assistant", "content": record["completion"]}]}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the JSONL file to write")
    parser.add_argument("--count", type=int, default=400, help="records to keep (default 400)")
    parser.add_argument("--chat", action="store_true", help="chat records ({'messages': ...})")
    args = parser.parse_args(argv)
    path = write_jsonl(args.out, args.count, chat=args.chat)
    print(f"{sum(1 for _ in open(path, encoding='utf-8'))} records written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
