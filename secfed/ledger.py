"""The privacy ledger: an append-only, fsynced, hash-chained JSON-lines file.

Rules (DESIGN.md): an entry for a round is appended and fsynced *before* the
model of that round is released or checkpointed; a resumed run replays the whole
ledger and appends to it, never resets it. Re-running a round after a crash adds
a second entry for it: the ledger may over-count, never under-count.

Each line carries ``prev``, the link of the previous line, so an edited or
reordered ledger is detected. A torn last line (a crash during the write, before
the round could be released) is ignored and cut off when the ledger is reopened.

Two chains (review finding 3), and a run states which one it has (``chain``):

* ``"sha256"`` (default): link = sha256(line). Detects accidental corruption and
  edits that do not also recompute the chain; anyone who can write the run folder can
  recompute it.
* ``"hmac-sha256"``: link = HMAC-SHA256(key, line), the key from the environment
  (``SECFED_LEDGER_KEY``, at least 16 bytes, or ``SECFED_LEDGER_KEY_FILE``, a file
  holding it). Tamper evidence against whoever can write the run folder but does not
  hold the key.

The checkpoint anchors the ledger (:meth:`PrivacyLedger.anchor`: its length and head
link at the checkpointed round); ``--resume`` refuses a ledger that does not extend
the anchored prefix (deleted, truncated, edited with the chain recomputed).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from pathlib import Path
from typing import Any

from secfed.errors import CheckpointError, SecfedError

GENESIS = "0" * 64


class LedgerWriteError(SecfedError):
    """The ledger could not be made durable (e.g. disk full): the round is not released."""


KEY_ENV, KEY_FILE_ENV = "SECFED_LEDGER_KEY", "SECFED_LEDGER_KEY_FILE"


def ledger_key_from_env() -> bytes | None:
    """The ledger MAC key from ``SECFED_LEDGER_KEY`` or ``SECFED_LEDGER_KEY_FILE`` (None: plain hash chain)."""
    raw: bytes | None = None
    if os.environ.get(KEY_FILE_ENV):
        try:
            raw = Path(os.environ[KEY_FILE_ENV]).read_bytes().strip()
        except OSError as e:
            raise CheckpointError(f"{KEY_FILE_ENV}: cannot read the ledger key file: {e.strerror or e}") from None
    elif os.environ.get(KEY_ENV):
        raw = os.environ[KEY_ENV].encode()
    if raw is not None and len(raw) < 16:
        raise CheckpointError(f"{KEY_ENV}: the ledger key must be at least 16 bytes")
    return raw


class PrivacyLedger:
    def __init__(self, path: str | Path, key: bytes | None = None) -> None:
        self.path = Path(path)
        self.key = key
        self.chain = "hmac-sha256" if key else "sha256"
        self._links: list[str] = []
        self._entries, self._last = self._read()

    def _link(self, line: bytes) -> str:
        if self.key:
            return hmac.new(self.key, line, hashlib.sha256).hexdigest()
        return hashlib.sha256(line).hexdigest()

    def head(self, n: int | None = None) -> str:
        """The link after the first n entries (all by default; GENESIS for none)."""
        n = len(self._links) if n is None else n
        return self._links[n - 1] if n > 0 else GENESIS

    def anchor(self) -> dict[str, Any]:
        """What the checkpoint records: the ledger's length, head link and chain kind."""
        return {"entries": len(self._entries), "head": self.head(), "chain": self.chain}

    def verify_anchor(self, anchor: Any) -> None:
        """Refuse a ledger that does not extend what the checkpoint anchored (one line)."""
        if not isinstance(anchor, dict) or not isinstance(anchor.get("entries"), int) or not isinstance(anchor.get("head"), str):
            raise CheckpointError("--resume: the checkpoint does not anchor the privacy ledger (made by an older secfed, "
                                  "or edited); refusing to trust the ledger")
        if anchor.get("chain", "sha256") != self.chain:
            need = f"set {KEY_ENV} (or {KEY_FILE_ENV}) to its key" if anchor.get("chain") == "hmac-sha256" else f"unset {KEY_ENV}"
            raise CheckpointError(f"--resume: the privacy ledger was chained with {anchor.get('chain')}, this run would use "
                                  f"{self.chain}; {need}")
        n = anchor["entries"]
        if len(self._entries) < n:
            raise CheckpointError(f"--resume: the privacy ledger {self.path} has {len(self._entries)} entries, the checkpoint "
                                  f"anchored {n} (deleted or truncated); refusing to restart the budget")
        if not hmac.compare_digest(self.head(n), anchor["head"]):
            raise CheckpointError(f"--resume: the privacy ledger {self.path} does not match the head the checkpoint "
                                  f"anchored at entry {n} (edited, its chain recomputed, or a wrong key)")

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
            if entry.get("chain") == "hmac-sha256" and not self.key:
                raise CheckpointError(f"privacy ledger {self.path}: written with a ledger key (HMAC chain); set "
                                      f"{KEY_ENV} or {KEY_FILE_ENV}")
            if entry.get("prev") != prev:
                raise CheckpointError(f"privacy ledger {self.path}: hash chain broken at line {i + 1} (edited or reordered"
                                      f"{', or a wrong key' if self.key else ''})")
            prev = self._link(line)
            self._links.append(prev)
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
        record = {"seq": len(self._entries), "time": time.time(), **entry, "chain": self.chain, "prev": self._last}
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
        self._last = self._link(line)
        self._links.append(self._last)
