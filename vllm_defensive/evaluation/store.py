"""Append-only JSONL of per-sample results: what makes a run resumable.

One line per (model, tokens, task, sample, method, budget, protocol), written as soon as the
answer is scored and flushed, so an interrupted run loses at most the requests in flight. On a
rerun, keys already present are skipped. A torn last line (a crash mid-write) is ignored.
Failed requests are not written (they are retried on the next run).
"""

from __future__ import annotations

import json
import lzma
import os
from pathlib import Path

KEY_FIELDS = ("model", "tokens", "task", "uid", "method", "budget", "protocol")


def budget_key(b: float) -> float:
    return round(float(b), 6)


def record_key(rec: dict) -> tuple:
    return (rec["model"], int(rec["tokens"]), rec["task"], rec["uid"], rec["method"], budget_key(rec["budget"]),
            rec["protocol"])


class ResultStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.bad_lines = 0
        self._records: dict[tuple, dict] = {}
        self._loaded = False

    def load(self) -> dict[tuple, dict]:
        self._records, self.bad_lines = {}, 0
        if self.path.is_file():
            opener = lzma.open if self.path.suffix == ".xz" else open
            with opener(self.path, "rt", encoding="utf-8") as f:
                for line in f:
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                        key = record_key(rec)
                    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                        self.bad_lines += 1
                        continue
                    self._records[key] = rec  # a later line for the same key wins
        self._loaded = True
        return self._records

    @property
    def records(self) -> list[dict]:
        if not self._loaded:
            self.load()
        return list(self._records.values())

    def __contains__(self, key: tuple) -> bool:
        if not self._loaded:
            self.load()
        return key in self._records

    def append(self, rec: dict) -> None:
        self.extend([rec])

    def extend(self, recs: list[dict]) -> None:
        if not recs:
            return
        if not self._loaded:
            self.load()
        keys = [record_key(r) for r in recs]  # validates before anything is written
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            # If the file ends in a torn line (a crash mid-write), start ours on a fresh one.
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode("utf-8"))
            f.flush()  # a killed process loses nothing written so far
        self._records.update(zip(keys, recs))


def merge_into(dst: ResultStore, src_path: str | Path) -> int:
    """Append the records of another results file (.jsonl or .jsonl.xz) that `dst` lacks."""
    src = ResultStore(src_path)
    if not src.path.is_file():
        raise FileNotFoundError(f"{src.path} does not exist")
    dst.load()
    new = [rec for key, rec in src.load().items() if key not in dst]
    dst.extend(new)
    return len(new)
