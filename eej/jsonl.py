"""JSON Lines input (prompt batch files, training data, benchmark questions): one place for its errors."""

from __future__ import annotations

import json
import os
from typing import Any, Iterable


def parse_jsonl(lines: Iterable[str], path: str, error: type[Exception] = ValueError) -> list[tuple[int, Any]]:
    """(1-based line number, parsed value) of every non-blank line; `error("PATH:LINE: not valid JSON (...)")`."""
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise error(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return out


def read_jsonl(path: str, what: str, error: type[Exception] = ValueError) -> list[tuple[int, Any]]:
    """`parse_jsonl` of a file; a missing file raises `error("WHAT not found: PATH")`."""
    if not os.path.isfile(path):
        raise error(f"{what} not found: {path}")
    with open(path, encoding="utf-8") as f:
        return parse_jsonl(f, path, error)
