"""Resumable benchmark runs: `eej bench --checkpoint FILE`.

The answers of every finished batch (all contestants, all turns) are appended to FILE as they come,
each batch closed by a marker line, and flushed to disk. Started again with the same settings and
FILE, the run takes those batches from the file and answers only the rest; a batch cut off by the
interruption (no marker) is answered again. The protocol is unchanged: each batch is still
answered by every contestant in the same process, in the same rotated order, with the same seeds.

FILE, JSONL:
  {"eej_bench_checkpoint": 1, "run": {settings that must match to resume}}
  {"batch": b, "record": {AnswerRecord fields}}   (one per answer of batch b)
  {"batch_done": b}
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from eej.bench.metrics import AnswerRecord

FORMAT = 1


class CheckpointError(ValueError):
    """The checkpoint file is unreadable or belongs to another run."""


class BenchCheckpoint:
    """The finished batches of a run (`completed`: batch index -> records) and the file they go to."""

    def __init__(self, path: str, run: dict[str, Any]):
        self.path = path
        self.completed: dict[int, list[AnswerRecord]] = {}
        run = json.loads(json.dumps(run))  # the form it takes in the file (tuples as lists)
        if os.path.exists(path) and os.path.getsize(path) > 0:
            keep = self._load(run)
            with open(path, "r+") as f:  # drop a batch cut off mid-way
                f.truncate(keep)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                f.write(json.dumps({"eej_bench_checkpoint": FORMAT, "run": run}) + "\n")

    def _load(self, run: dict[str, Any]) -> int:
        """Read the finished batches; -> the file offset after the last complete batch."""
        pending: dict[int, list[AnswerRecord]] = {}
        keep = 0
        with open(self.path, "rb") as f:
            n = 0
            while raw := f.readline():
                n += 1
                try:
                    line = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    break  # a line cut off by the interruption: everything after it is redone
                if n == 1:
                    if not isinstance(line, dict) or line.get("eej_bench_checkpoint") != FORMAT \
                            or not isinstance(line.get("run"), dict):
                        raise CheckpointError(f"{self.path} is not an eej bench checkpoint")
                    differ = sorted(k for k in set(run) | set(line["run"]) if run.get(k) != line["run"].get(k))
                    if differ:
                        raise CheckpointError(
                            f"{self.path} belongs to another run ({', '.join(differ)} differ); "
                            "use another --checkpoint file or delete this one"
                        )
                elif isinstance(line, dict) and isinstance(line.get("batch_done"), int):
                    self.completed[line["batch_done"]] = pending.pop(line["batch_done"], [])
                else:
                    pending.setdefault(self._batch(line, n), []).append(self._record(line, n))
                    continue
                keep = f.tell()
        return keep

    def _batch(self, line: Any, n: int) -> int:
        if not (isinstance(line, dict) and isinstance(line.get("batch"), int) and isinstance(line.get("record"), dict)):
            raise CheckpointError(f"{self.path}:{n}: not a checkpoint line (expected batch and record); the file is "
                                  "damaged: delete it to start the run again")
        return line["batch"]

    def _record(self, line: dict[str, Any], n: int) -> AnswerRecord:
        try:
            return AnswerRecord(**line["record"])
        except TypeError as e:
            raise CheckpointError(f"{self.path}:{n}: not an answer record ({e}); the file is damaged: delete it to "
                                  "start the run again") from None

    def add(self, batch: int, records: list[AnswerRecord]) -> None:
        """Append batch `batch`'s records and its marker, on disk before returning."""
        lines = [json.dumps({"batch": batch, "record": dataclasses.asdict(r)}) for r in records]
        with open(self.path, "a") as f:
            f.write("\n".join([*lines, json.dumps({"batch_done": batch})]) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.completed[batch] = list(records)
