"""Atomic per-round checkpoints: tensors as safetensors, the rest as JSON.

``checkpoint/`` holds ``tensors.safetensors`` (global trainable weights, server
optimizer state, stage tensors) and ``state.json`` (round, config fingerprint,
JSON state). It is written to a temporary folder and renamed into place, so a
crash leaves either the old or the new checkpoint, never a mix.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

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


def save_checkpoint(run_dir: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    final = run_dir / "checkpoint"
    tmp = run_dir / "checkpoint.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
    with (tmp / "state.json").open("w") as f:
        json.dump(state, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    with (tmp / "tensors.safetensors").open("rb") as f:
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


def load_checkpoint(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    final = run_dir / "checkpoint"
    if not final.exists() and (run_dir / "checkpoint.old").exists():
        final = run_dir / "checkpoint.old"  # crashed between the two renames
    try:
        tensors = load_file(str(final / "tensors.safetensors"))
        state = json.loads((final / "state.json").read_text())
    except (OSError, SafetensorError, json.JSONDecodeError, ValueError) as e:
        raise CheckpointError(f"no usable checkpoint in {run_dir}: {e}") from None
    if not isinstance(state, dict) or not isinstance(state.get("round"), int):
        raise CheckpointError(f"checkpoint in {run_dir} has no round number")
    return tensors, state
