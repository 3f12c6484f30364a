"""Reading JSONL files (training data, HellaSwag) with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import islice
from pathlib import Path


def iter_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    """("path:line", record) for each non-blank line; a line that is not a JSON object is named,
    so a .json array or a CSV gives one clear error instead of a bare decoder message."""
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
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
