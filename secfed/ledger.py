"""The privacy ledger: an append-only, fsynced, hash-chained JSON-lines file.

Rules (DESIGN.md): an entry for a round is appended and fsynced *before* the
model of that round is released or checkpointed; a resumed run replays the whole
ledger and appends to it, never resets it. Re-running a round after a crash adds
a second entry for it: the ledger may over-count, never under-count.

Each line carries ``prev``, the sha256 of the previous line, so an edited or
reordered ledger is detected. A torn last line (a crash during the write, before
the round could be released) is ignored and cut off when the ledger is reopened.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from secfed.errors import CheckpointError, SecfedError

GENESIS = "0" * 64


class LedgerWriteError(SecfedError):
    """The ledger could not be made durable (e.g. disk full): the round is not released."""


class PrivacyLedger:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._entries, self._last = self._read()

    def _read(self) -> tuple[list[dict[str, Any]], str]:
        if not self.path.exists():
            return [], GENESIS
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        entries, prev, good_len = [], GENESIS, 0
        for i, line in enumerate(lines):
            if not line:
                continue
            complete = i < len(lines) - 1  # followed by a newline
            try:
                entry = json.loads(line)
                if not isinstance(entry, dict):
                    raise ValueError("not an object")
            except ValueError:  # JSONDecodeError, UnicodeDecodeError, not an object
                if complete:
                    raise CheckpointError(f"privacy ledger {self.path}: line {i + 1} is corrupt") from None
                break  # torn final write
            if not complete:
                break
            if entry.get("prev") != prev:
                raise CheckpointError(f"privacy ledger {self.path}: hash chain broken at line {i + 1} (edited or reordered)")
            prev = hashlib.sha256(line).hexdigest()
            entries.append(entry)
            good_len += len(line) + 1
        if good_len != len(raw):  # cut a torn tail so the next append starts clean
            with self.path.open("r+b") as f:
                f.truncate(good_len)
                f.flush()
                os.fsync(f.fileno())
        return entries, prev

    @property
    def entries(self) -> list[dict[str, Any]]:
        return list(self._entries)

    def append(self, entry: dict[str, Any]) -> None:
        record = {"seq": len(self._entries), "time": time.time(), **entry, "prev": self._last}
        line = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
        new = not self.path.exists()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                data = line + b"\n"
                written = os.write(fd, data)
                if written != len(data):
                    raise OSError(28, "short write to privacy ledger")
                os.fsync(fd)
            finally:
                os.close(fd)
            if new:
                dfd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except OSError as e:
            raise LedgerWriteError(f"cannot write the privacy ledger {self.path}: {e.strerror or e}; the round was not released") from None
        self._entries.append(record)
        self._last = hashlib.sha256(line).hexdigest()
