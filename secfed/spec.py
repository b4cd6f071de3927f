"""Flat update vectors and the spec that names their pieces.

Convention (DESIGN.md): on the engine's hot path an update is one flat ``float32``
tensor plus a :class:`ParamSpec` giving the names and shapes of the trainable
(adapter and head) parameters, in a fixed order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ParamSpec:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def from_module(cls, model: nn.Module) -> "ParamSpec":
        """The trainable parameters of ``model`` in registration order."""
        items = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
        return cls(tuple(n for n, _ in items), tuple(s for _, s in items))

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def flatten(self, model: nn.Module) -> torch.Tensor:
        """Copy the spec's parameters of ``model`` into one flat float32 tensor."""
        params = dict(model.named_parameters())
        return torch.cat([params[n].detach().reshape(-1).to(torch.float32) for n in self.names])

    def assign(self, model: nn.Module, flat: torch.Tensor) -> None:
        """Write ``flat`` into the spec's parameters of ``model`` (in place)."""
        if flat.numel() != self.numel:
            raise ValueError(f"flat vector has {flat.numel()} values, spec needs {self.numel}")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, piece in zip(self.names, torch.split(flat, self.sizes)):
                params[n].copy_(piece.view_as(params[n]))

    def to_dict(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: p.reshape(s).clone() for n, s, p in zip(self.names, self.shapes, torch.split(flat, self.sizes))}

    def from_dict(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise ValueError(f"missing tensors: {missing[:3]}")
        for n, s in zip(self.names, self.shapes):
            if tuple(tensors[n].shape) != s:
                raise ValueError(f"tensor {n} has shape {tuple(tensors[n].shape)}, expected {s}")
        return torch.cat([tensors[n].reshape(-1).float() for n in self.names])
