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


class KeptOptimizerState:
    """``client.optimizer_state``: "round" (a fresh local optimizer each round) or "keep" (each client's
    optimizer state carried to its next round: Adam's moments and step count, SGD's momentum buffer).

    Why keep it: with a fresh Adam every round and few local steps, the second-moment estimate comes from
    1-4 gradients, so each step is close to ``lr * sign(g)`` and, under DP-SGD's noise, moves every
    coordinate by ~lr whatever its signal; a kept estimate converges to the gradient's variance (noise
    included) and scales each coordinate by its signal-to-noise ratio. The state stays where the trainer is
    (the engine's trainer in-process, the SuperNode's over Flower: its node state), never in a message; under
    record-level DP it is a function of the client's own noised gradients only (post-processing). Costs two
    (Adam) or one (SGD momentum) copies of the trainable parameters per client: meant for cross-silo runs.
    The server's own root-data update (client id -1) keeps nothing."""

    def __init__(self, mode: str = "round") -> None:
        if mode not in ("round", "keep"):
            raise ValueError(f"client.optimizer_state: 'round' or 'keep' (got {mode!r})")
        self.keep = mode == "keep"
        self.states: dict[int, dict[int, dict[str, torch.Tensor]]] = {}

    def restore(self, opt: torch.optim.Optimizer, client_id: int) -> None:
        """Load ``client_id``'s kept state into a freshly built ``opt`` (same parameters, same order)."""
        saved = self.states.get(client_id) if self.keep else None
        if saved:
            sd = opt.state_dict()
            sd["state"] = {i: {k: v.clone() for k, v in st.items()} for i, st in saved.items()}
            opt.load_state_dict(sd)

    def save(self, opt: torch.optim.Optimizer, client_id: int) -> None:
        if self.keep and client_id >= 0:
            self.states[client_id] = {int(i): {k: (v.detach().clone() if torch.is_tensor(v) else torch.tensor(float(v)))
                                               for k, v in st.items()} for i, st in opt.state_dict()["state"].items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat ``o<client>.<param index>.<name>`` tensors (safetensors in checkpoints and Flower node state)."""
        return {f"o{c}.{i}.{k}": v for c, st in sorted(self.states.items()) for i, s in sorted(st.items())
                for k, v in sorted(s.items())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        states: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
        for key, v in state.items():
            parts = key.split(".")
            if len(parts) != 3 or not parts[0].startswith("o") or not isinstance(v, torch.Tensor):
                continue  # another trainer's keys
            try:
                c, i = int(parts[0][1:]), int(parts[1])
            except ValueError:
                raise ValueError(f"kept optimizer state: malformed key {key[:80]!r}") from None
            states.setdefault(c, {}).setdefault(i, {})[parts[2]] = v.clone()
        self.states = states


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


def physical_batches(data: TensorData, idx: torch.Tensor, size: int) -> list[torch.Tensor]:
    """One logical batch ``idx`` as the index chunks of its forward/backward passes (``client.physical_batch_size``;
    0 or a batch no larger: one pass). With an attention mask the rows go shortest first (stable), so each pass's
    padding is trimmed to its own longest row (``ClassificationTask.inputs``, the causal LM's ``token_nll``): the
    per-example losses and gradients are those of the one-pass batch, the padding compute is not. Opacus'
    ``BatchMemoryManager`` splits a Poisson batch the same way (a logical step over several physical ones)."""
    if size <= 0 or len(idx) <= size:
        return [idx]
    mask = data.tensors.get("attention_mask")
    if mask is not None:
        idx = idx[torch.argsort(mask[idx].sum(1), stable=True)]
    return list(idx.split(size))


class SGDTrainer:
    """Minibatch training on the task's loss (``task.loss``); a fresh optimizer per client and round, or each
    client's own kept from round to round (``optimizer_state = "keep"``, :class:`KeptOptimizerState`)."""

    private = False  # no per-example clipping or noise (secfed.needs.is_private)

    def __init__(self, local_epochs: int = 1, local_steps: int = 0, batch_size: int = 16, lr: float = 5e-3,
                 optimizer: str = "adam", momentum: float = 0.0, weight_decay: float = 0.0,
                 record_sample_rate: float | None = None, optimizer_state: str = "round",
                 physical_batch_size: int = 0) -> None:
        self.local_epochs, self.local_steps, self.batch_size = local_epochs, local_steps, batch_size
        self.physical_batch_size = physical_batch_size  # passes of at most this many examples (0: one pass)
        self.record_sample_rate = record_sample_rate  # a batch of round(q n) of the client's n records
        self.lr, self.optimizer, self.momentum, self.weight_decay = lr, optimizer, momentum, weight_decay
        self.kept = KeptOptimizerState(optimizer_state)

    def train(self, model: nn.Module, task: Any, data: TensorData, generator: torch.Generator, client_id: int = 0,
              used: list[torch.Tensor] | None = None) -> dict[str, float]:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(params, self.optimizer, self.lr, self.momentum, self.weight_decay)
        self.kept.restore(opt, client_id)
        model.train()
        total, steps, seen = 0.0, 0, 0
        bs = batch_size_for(len(data), self.batch_size, self.record_sample_rate)
        for idx in batch_schedule(len(data), bs, self.local_epochs, self.local_steps, generator):
            if used is not None:
                used.append(idx)
            opt.zero_grad(set_to_none=True)
            loss = 0.0
            for part in physical_batches(data, idx, self.physical_batch_size):  # the batch mean, pass by pass
                part_loss = task.loss(model, data.batch(part)) * (len(part) / len(idx))
                part_loss.backward()
                loss += part_loss.item()
            opt.step()
            total += loss * len(idx)
            seen += len(idx)
            steps += 1
        self.kept.save(opt, client_id)
        return {"train_loss": total / max(seen, 1), "steps": steps, "examples_seen": seen}

    def state_dict(self) -> dict[str, Any]:
        return self.kept.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kept.load_state_dict(state)
