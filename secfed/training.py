"""Local training on a client's shard: the plain (non-private) trainer.

A trainer is one object with ``train(model, task, data, generator, client_id=0, used=None) -> metrics``.
It updates the trainable parameters of ``model`` in place; the engine computes
the delta. When ``used`` is a list, the trainer appends the example indices of each
local step to it, in order: the engine's evaluation-only ground truth
(:mod:`secfed.truth`); attacks read that and never rebuild the schedule. The DP-SGD
trainer (``defenses.privacy``) has the same shape.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from secfed.data import TensorData


def make_optimizer(params: list[nn.Parameter], kind: str, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {kind}")


def batch_size_for(n: int, batch_size: int, record_sample_rate: float | None) -> int:
    """A client's batch: ``round(q n)`` of its n records with ``client.record_sample_rate`` q, else ``batch_size``."""
    return max(1, round(record_sample_rate * n)) if record_sample_rate else batch_size


def batch_schedule(n: int, batch_size: int, local_epochs: int, local_steps: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Index batches for one client: ``local_steps`` batches if > 0, else ``local_epochs`` shuffled epochs."""
    out: list[torch.Tensor] = []
    if n == 0:
        return out
    if local_steps > 0:
        perm = torch.randperm(n, generator=generator)
        pos = 0
        for _ in range(local_steps):
            if pos + batch_size > n:
                perm, pos = torch.randperm(n, generator=generator), 0
            out.append(perm[pos : pos + batch_size])
            pos += batch_size
        return out
    for _ in range(local_epochs):
        perm = torch.randperm(n, generator=generator)
        out.extend(perm[s : s + batch_size] for s in range(0, n, batch_size))
    return out


class SGDTrainer:
    """Minibatch training on the task's loss (``task.loss``); a fresh optimizer per client and round."""

    private = False  # no per-example clipping or noise (secfed.needs.is_private)

    def __init__(self, local_epochs: int = 1, local_steps: int = 0, batch_size: int = 16, lr: float = 5e-3,
                 optimizer: str = "adam", momentum: float = 0.0, weight_decay: float = 0.0,
                 record_sample_rate: float | None = None) -> None:
        self.local_epochs, self.local_steps, self.batch_size = local_epochs, local_steps, batch_size
        self.record_sample_rate = record_sample_rate  # a batch of round(q n) of the client's n records
        self.lr, self.optimizer, self.momentum, self.weight_decay = lr, optimizer, momentum, weight_decay

    def train(self, model: nn.Module, task: Any, data: TensorData, generator: torch.Generator, client_id: int = 0,
              used: list[torch.Tensor] | None = None) -> dict[str, float]:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(params, self.optimizer, self.lr, self.momentum, self.weight_decay)
        model.train()
        total, steps, seen = 0.0, 0, 0
        bs = batch_size_for(len(data), self.batch_size, self.record_sample_rate)
        for idx in batch_schedule(len(data), bs, self.local_epochs, self.local_steps, generator):
            if used is not None:
                used.append(idx)
            batch = data.batch(idx)
            opt.zero_grad(set_to_none=True)
            loss = task.loss(model, batch)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            steps += 1
        return {"train_loss": total / max(seen, 1), "steps": steps, "examples_seen": seen}
