"""Worker momentum for robust aggregation (Karimireddy, He & Jaggi 2021, "Learning from
history for Byzantine robust optimization").

Each client keeps its own momentum buffer across rounds,
``m_i <- beta m_i + (1 - beta) g_i`` at every local step, and steps
``w <- w - lr (m_i + weight_decay w)``. Momentum shrinks the variance of honest
updates, so that a robust aggregator such as CenteredClipping can tell them from
time-coupled attacks (ALIE, IPM). The buffers are checkpointed (``state_dict``)
so a resumed run continues them. Registered as trainer ``momentum-sgd``.

Differs from ``client.optimizer = "sgd"`` with ``client.momentum``: torch's SGD
momentum is undamped (``m <- beta m + g``) and restarts each round.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from secfed.data import TensorData
from secfed.training import batch_schedule, batch_size_for


class MomentumTrainer:
    """Local SGD with a per-client momentum buffer that persists across rounds."""

    private = False  # no per-example clipping or noise (secfed.needs.is_private)

    def __init__(self, beta: float = 0.9, local_epochs: int = 1, local_steps: int = 0, batch_size: int = 16,
                 lr: float = 5e-3, weight_decay: float = 0.0, record_sample_rate: float | None = None) -> None:
        if not 0 <= beta < 1:
            raise ValueError("momentum-sgd: beta must be in [0, 1)")
        self.beta, self.local_epochs, self.local_steps = float(beta), local_epochs, local_steps
        self.batch_size, self.lr, self.weight_decay = batch_size, lr, weight_decay
        self.record_sample_rate = record_sample_rate
        self.buffers: dict[int, torch.Tensor] = {}

    def train(self, model: nn.Module, task: Any, data: TensorData, generator: torch.Generator,
              client_id: int = 0, used: list[torch.Tensor] | None = None) -> dict[str, float]:
        params = [p for p in model.parameters() if p.requires_grad]
        d = sum(p.numel() for p in params)
        m = self.buffers.get(client_id)
        if m is None or m.numel() != d:
            m = torch.zeros(d)
        model.train()
        total, steps, seen = 0.0, 0, 0
        bs = batch_size_for(len(data), self.batch_size, self.record_sample_rate)
        for idx in batch_schedule(len(data), bs, self.local_epochs, self.local_steps, generator):
            if used is not None:  # the engine's evaluation-only ground truth (secfed.truth)
                used.append(idx)
            batch = data.batch(idx)
            for p in params:
                p.grad = None
            loss = task.loss(model, batch)
            loss.backward()
            g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
            m.mul_(self.beta).add_(g, alpha=1.0 - self.beta)
            with torch.no_grad():
                off = 0
                for p in params:
                    k = p.numel()
                    step = m[off:off + k].view_as(p)
                    if self.weight_decay:
                        step = step + self.weight_decay * p
                    p.sub_(self.lr * step)
                    off += k
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
            steps += 1
        if client_id >= 0:  # the server's own root-data update (client_id -1) keeps no buffer
            self.buffers[client_id] = m
        return {"train_loss": total / max(seen, 1), "steps": steps, "examples_seen": seen}

    def state_dict(self) -> dict[str, Any]:
        return {f"m{cid}": buf for cid, buf in sorted(self.buffers.items())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffers = {int(k[1:]): v.clone() for k, v in state.items() if k.startswith("m") and isinstance(v, torch.Tensor)}
