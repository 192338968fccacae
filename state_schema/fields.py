"""The run's record fields: which ones each format and task reads, and how `data.columns`
and Hub dataset sources are written in run.yaml.

One table serves the config's validation (here, before anything heavy is imported) and the
engine's column mapping (`training/columns.py`), so the keys `data.columns` accepts are
exactly the fields the engine reads.
"""

from __future__ import annotations

import re
from typing import Optional

# shape -> (required fields, optional fields). A causal-LM run's shape is its data.format; a
# classification run's is "classification" whatever its format.
FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "text": (("text",), ()),
    "pairs": (("prompt", "completion"), ()),
    "chat": (("messages",), ()),
    "classification": (("text", "label"), ("text_pair",)),
}
CAUSAL_FORMATS = ("text", "pairs", "chat")

# hf://datasets/OWNER/NAME, optionally @REVISION (a branch, tag or commit; may hold '/').
HUB_DATASET = re.compile(r"^hf://datasets/([A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(.+))?$")


def shape_of(fmt: str, task: str = "causal_lm") -> str:
    return "classification" if task == "classification" else fmt


def fields_of(shape: str) -> tuple[str, ...]:
    required, optional = FIELDS[shape]
    return required + optional


def check_column_keys(columns: dict[str, str], fmt: str, task: str = "causal_lm") -> None:
    """ValueError naming a key of `data.columns` the run cannot use, and the keys it can."""
    if not columns:
        return
    if task == "classification":
        shapes = ["classification"]
    else:
        shapes = list(CAUSAL_FORMATS) if fmt == "auto" else [fmt]
    for shape in shapes:
        if set(columns) <= set(fields_of(shape)):
            return
    allowed = " | ".join("{" + ", ".join(fields_of(s)) + "}" for s in shapes)
    what = f"task {task!r}" if task == "classification" else f"data.format {fmt!r}"
    raise ValueError(
        f"data.columns has keys {sorted(columns)}, which no one record shape of {what} reads; "
        f"its keys are the run's fields: {allowed} (each maps to a column of the file, or to "
        "a template such as \"{instruction}\\n\\n{input}\")")


def parse_hub_dataset(uri: str) -> Optional[tuple[str, Optional[str]]]:
    """(repo id, revision or None) for an hf://datasets/ URI; None for anything else;
    ValueError for an hf:// URI that is not a dataset's."""
    if not uri.startswith("hf://"):
        return None
    match = HUB_DATASET.match(uri)
    if not match:
        raise ValueError(f"data source {uri!r} is not a Hub dataset URI; write "
                         "hf://datasets/OWNER/NAME or hf://datasets/OWNER/NAME@REVISION")
    return match.group(1), match.group(2)


def task_of(config_or_spec) -> str:
    """The run's task; "causal_lm" for configs and specs that have no `task` field."""
    return getattr(config_or_spec, "task", None) or "causal_lm"
