"""From a file's columns to the run's fields: `data.columns`, alpaca and ShareGPT records.

A run reads records with fixed field names (`state_schema.fields.FIELDS`: text; prompt and
completion; messages; text, text_pair and label for classification). `data.columns` maps each
field to a column of the file, or to a template of columns (`"{instruction}\\n\\n{input}"`,
Python format syntax, the result stripped of surrounding whitespace so an empty `input` leaves
no trailing blank lines). With no mapping, `format: auto` recognises alpaca records
(instruction / input / output) and ShareGPT records (`conversations` of from / value) and
fills in their mapping, which the spec then keeps, so every session, plan and eval.py read the
same fields the same way. Chat turns are normalised to role / content whatever their keys
(from / value) and role names (human, gpt, ...).

The one entry point for readers is `load_records`; `resolve_columns` runs once, when the
run is created.
"""

from __future__ import annotations

import json
from pathlib import Path
from string import Formatter
from typing import Any, Optional

from baton.state_schema.fields import CAUSAL_FORMATS, FIELDS, fields_of, shape_of

from .data import DataError, check_format, read_records

ALPACA = {"prompt": "{instruction}\n\n{input}", "completion": "output"}
SHAREGPT = {"messages": "conversations"}
# ShareGPT and other exports name the speakers their own way; the chat template wants these.
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
         "bot": "assistant", "system": "system", "tool": "tool"}


def load_records(path: Path, columns: dict[str, str], fmt: str,
                 task: str = "causal_lm") -> list[dict[str, Any]]:
    """The records of `path` (a file or a folder of files) as the run's fields, checked
    against the format. DataError names the record, the column and the columns there are."""
    records = map_records(read_records(path), columns, fmt, task, source=path)
    if task != "classification":
        check_format(records, fmt, source=path)
    return records


def resolve_columns(record: dict[str, Any], columns: dict[str, str], fmt: str,
                    task: str = "causal_lm", *, source: Any) -> tuple[str, dict[str, str]]:
    """(format, mapping) the run will read, from its first record: the config's mapping
    checked, or with none, the alpaca or ShareGPT mapping when the record is one."""
    if task == "classification":
        map_record(record, columns, "classification", source=source, number=1)
        return (fmt if fmt != "auto" else "text"), dict(columns)
    if not columns:
        found = recognise(record)
        if found is not None and fmt in ("auto", found[0]):
            fmt, columns = found
        return fmt, dict(columns)
    shapes = [s for s in (("chat", "pairs", "text") if fmt == "auto" else (fmt,))
              if set(columns) <= set(fields_of(s))]
    first_error: Optional[DataError] = None
    for shape in shapes:
        try:
            map_record(record, columns, shape, source=source, number=1)
            return shape, dict(columns)
        except DataError as exc:
            first_error = first_error or exc
    if first_error is None:  # the config's validation already refuses such keys
        raise DataError(f"data.columns keys {sorted(columns)} fit no format of {CAUSAL_FORMATS}")
    raise first_error


def recognise(record: dict[str, Any]) -> Optional[tuple[str, dict[str, str]]]:
    """(format, mapping) of a record in a shape Baton knows, or None."""
    if isinstance(record.get("messages"), list):
        return "chat", {}
    if "prompt" in record and "completion" in record:
        return "pairs", {}
    if "instruction" in record and "output" in record:
        mapping = dict(ALPACA) if "input" in record else {"prompt": "{instruction}",
                                                          "completion": "output"}
        return "pairs", mapping
    turns = record.get("conversations")
    if isinstance(turns, list) and turns and isinstance(turns[0], dict) and "from" in turns[0]:
        return "chat", dict(SHAREGPT)
    if "text" in record:
        return "text", {}
    return None


def map_records(records: list[dict[str, Any]], columns: dict[str, str], fmt: str,
                task: str = "causal_lm", *, source: Any) -> list[dict[str, Any]]:
    """Every record as the run's fields. With no mapping, native records pass unchanged
    (apart from chat turns being normalised), so runs made before data.columns read the same."""
    shape = shape_of(fmt, task)
    if not columns and shape != "classification":
        return [_normalised(r, source, n) for n, r in enumerate(records, 1)]
    return [map_record(r, columns, shape, source=source, number=n)
            for n, r in enumerate(records, 1)]


def map_record(record: dict[str, Any], columns: dict[str, str], shape: str, *, source: Any,
               number: int) -> dict[str, Any]:
    required, optional = FIELDS[shape]
    out: dict[str, Any] = {}
    for name in required + optional:
        column = columns.get(name, name)
        if "{" in column:
            out[name] = _render(column, record, name, source, number)
        elif column in record:
            out[name] = record[column]
        elif name in required or name in columns:
            raise _missing(column, name, record, source, number)
    if "messages" in out:
        out["messages"] = normalise_turns(out["messages"], source, number)
    return out


def _render(template: str, record: dict[str, Any], name: str, source: Any, number: int) -> str:
    try:
        names = [field for _, field, _, _ in Formatter().parse(template) if field is not None]
    except ValueError as exc:
        raise DataError(f"data.columns.{name} is not a valid template ({exc}); name columns "
                        "in braces, e.g. \"{instruction}\\n\\n{input}\", and double a literal "
                        "brace ({{ or }})") from None
    for field in names:
        if field not in record:
            raise _missing(field, name, record, source, number, template=template)
    values = {k: "" if v is None else v for k, v in record.items()}
    return template.format_map(values).strip()


def _missing(column: str, name: str, record: dict[str, Any], source: Any, number: int,
             template: Optional[str] = None) -> DataError:
    via = f"the template {template!r} of data.columns.{name}" if template else (
        f"data.columns.{name}" if column != name else f"the run's field {name!r}")
    return DataError(
        f"{source} record {number} has no column {column!r} (needed by {via}); the columns "
        f"there are: {', '.join(sorted(map(str, record)))}. Map the field to one of them in "
        f"data.columns, e.g. data.columns: {{{name}: COLUMN}}")


def _normalised(record: dict[str, Any], source: Any, number: int) -> dict[str, Any]:
    messages = record.get("messages")
    if not isinstance(messages, (list, str)):
        return record
    return {**record, "messages": normalise_turns(messages, source, number)}


def normalise_turns(turns: Any, source: Any, number: int) -> Any:
    """Chat turns as [{role, content}], from role/content or from/value keys; a JSON string
    (a CSV cell) is decoded first. Anything else is left for check_format to refuse."""
    if isinstance(turns, str):
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError as exc:
            raise DataError(f"{source} record {number}: the conversation is a string that is "
                            f"not a JSON list of turns ({exc})") from None
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        return turns
    return [_turn(t, source, number) for t in turns]


def _turn(turn: dict[str, Any], source: Any, number: int) -> dict[str, Any]:
    """One turn as role/content; its other keys (name, tool_calls, ...) are kept for the
    chat template."""
    if "role" in turn and "content" in turn:
        speaker, content = turn["role"], turn["content"]
    elif "from" in turn and "value" in turn:
        speaker, content = turn["from"], turn["value"]
    else:
        raise DataError(f"{source} record {number}: a turn has keys {sorted(turn)}; give "
                        "role/content (or ShareGPT's from/value) in every turn")
    rest = {k: v for k, v in turn.items() if k not in ("role", "content", "from", "value")}
    # A role the table does not know passes as it is: the chat template judges it.
    return {**rest, "role": ROLES.get(str(speaker).lower(), speaker), "content": content}
