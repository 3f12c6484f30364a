"""Reading JSONL files (training data, HellaSwag) with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import islice
from pathlib import Path


def iter_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    """("path:line", record) for each non-blank line; a line that is not a JSON object is named,
    so a .json array or a CSV gives one clear error instead of a bare decoder message."""
    # NOTE: bytes, decoded line by line, so that a line that is not UTF-8 is named.
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{where} is not UTF-8 text (byte {raw[err.start]:#04x} at column {err.start + 1}); "
                    "save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where} is not valid JSON ({err}); pass a JSONL file, one JSON object per line") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where} is a JSON {type(record).__name__}, not an object; pass one JSON object per line")
            yield where, record


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    """The first ``limit`` records (all when None) of a JSONL file."""
    return [record for _, record in islice(iter_jsonl(path), limit)]


def json_type(value) -> str:
    """How JSON calls the type of ``value`` (for messages about a record's fields)."""
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list"}
    return names.get(type(value), "an object")


def text_field(record: dict, key: str, where: str, default: str | None = None) -> str:
    """``record[key]`` checked to be a string (``default`` when absent and one is given)."""
    value = record.get(key, default)
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key} must be a string, got {json_type(value)}")
    return value
