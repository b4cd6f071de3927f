"""Atomic per-round checkpoints: tensors as safetensors, the rest as JSON.

``checkpoint/`` holds ``tensors.safetensors`` (global trainable weights, server
optimizer state, stage tensors) and ``state.json`` (round, config fingerprint,
JSON state). It is written to a temporary folder and renamed into place, so a
crash leaves either the old or the new checkpoint, never a mix.

Integrity (issue 22, review finding 3): ``state.json`` records ``tensors_sha256``, the
sha256 of the tensors file; the loader hashes the bytes it parses and refuses a
mismatch (one line). With a key (the ledger key, :func:`secfed.ledger.ledger_key_from_env`)
``state.json`` also carries ``mac``, an HMAC-SHA256 over the rest of the state, so the
round, the checksum and the ledger anchor cannot be edited without the key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from secfed.errors import CheckpointError


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def split_state(prefix: str, state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A plug-in's ``state_dict()`` as (tensors keyed ``prefix.key`` for safetensors, the rest for JSON)."""
    tensors = {f"{prefix}.{k}": v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return tensors, {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}


def _state_mac(state: dict[str, Any], key: bytes) -> str:
    body = json.dumps({k: v for k, v in state.items() if k != "mac"}, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, b"secfed-checkpoint-v1\0" + body, hashlib.sha256).hexdigest()


def save_checkpoint(run_dir: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any], key: bytes | None = None) -> None:
    final = run_dir / "checkpoint"
    tmp = run_dir / "checkpoint.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    blob = save_tensors({k: v.detach().contiguous().clone() for k, v in tensors.items()})
    state = {**state, "tensors_sha256": hashlib.sha256(blob).hexdigest()}
    state.pop("mac", None)
    if key:
        state["mac"] = _state_mac(state, key)
    with (tmp / "tensors.safetensors").open("wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    with (tmp / "state.json").open("w") as f:
        json.dump(state, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    old = run_dir / "checkpoint.old"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    _fsync_dir(run_dir)
    if old.exists():
        shutil.rmtree(old)


def load_checkpoint(run_dir: Path, key: bytes | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    final = run_dir / "checkpoint"
    if not final.exists() and (run_dir / "checkpoint.old").exists():
        final = run_dir / "checkpoint.old"  # crashed between the two renames
    try:
        blob = (final / "tensors.safetensors").read_bytes()
        state = json.loads((final / "state.json").read_text())
    except (OSError, json.JSONDecodeError, ValueError) as e:
        raise CheckpointError(f"no usable checkpoint in {run_dir}: {e}") from None
    if not isinstance(state, dict) or not isinstance(state.get("round"), int):
        raise CheckpointError(f"checkpoint in {run_dir} has no round number")
    if key:
        mac = state.get("mac")
        if not isinstance(mac, str) or not hmac.compare_digest(mac, _state_mac(state, key)):
            raise CheckpointError(f"checkpoint in {run_dir}: its state does not carry a valid MAC under the ledger key "
                                  "(edited, made without the key, or a wrong key)")
    want = state.get("tensors_sha256")
    if not isinstance(want, str):
        raise CheckpointError(f"checkpoint in {run_dir} has no tensors checksum (made by an older secfed, or edited)")
    if not hmac.compare_digest(hashlib.sha256(blob).hexdigest(), want):
        raise CheckpointError(f"checkpoint in {run_dir}: tensors.safetensors does not match its sha256 (corrupted or edited)")
    try:
        tensors = load_tensors(blob)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"no usable checkpoint in {run_dir}: {e}") from None
    return tensors, state
