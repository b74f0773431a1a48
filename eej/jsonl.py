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
    """`parse_jsonl` of a file; a missing file, a directory or text that is not UTF-8 raises `error` naming the path."""
    if os.path.isdir(path):
        raise error(f"{what} {path} is a directory; give a .jsonl file")
    if not os.path.isfile(path):
        raise error(f"{what} not found: {path}")
    with open(path, "rb") as f:
        return parse_jsonl(_utf8_lines(f, path, error), path, error)


def _utf8_lines(raw_lines: Iterable[bytes], path: str, error: type[Exception]) -> Iterable[str]:
    for n, raw in enumerate(raw_lines, 1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start} of the line); "
                        "save the file as UTF-8") from None
