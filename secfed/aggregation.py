"""The plain aggregator and server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization")."""

from __future__ import annotations

from typing import Any

import torch

from secfed.needs import Need


class Mean:
    """Weighted mean: sum_i w_i x_i / sum_i w_i (example-weighted FedAvg, McMahan et al. 2017).

    Works on a secure sum (``needs = Need.SUM``, secfed.needs): the engine calls
    :meth:`from_sum` with the sum and total weight. With ``denominator =
    "expected"`` it divides by the expected cohort weight instead (DP-FedAvg's
    fixed denominator qN, McMahan et al. 2018).
    """

    needs = Need.SUM

    def __init__(self, denominator: str = "actual") -> None:
        if denominator not in ("actual", "expected"):
            raise ValueError("denominator must be 'actual' or 'expected'")
        self.denominator = denominator

    def __call__(self, X: torch.Tensor, weights: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
        w = torch.ones(len(X), dtype=X.dtype) if weights is None else weights.to(X.dtype)
        return (w @ X) / w.sum().clamp_min(1e-12)  # one pass over X, no (n, d) temporary

    def from_sum(self, total: torch.Tensor, total_weight: float, expected_weight: float) -> torch.Tensor:
        denom = expected_weight if self.denominator == "expected" else total_weight
        return total / max(denom, 1e-12)


class ServerOptimizer:
    """w_{t+1} from w_t and the aggregate update Delta (a descent direction already).

    fedavg:  w += lr * Delta
    fedavgm: m = beta * m + Delta; w += lr * m                    (Hsu et al. 2019)
    fedadam: m = b1 m + (1-b1) Delta; v = b2 v + (1-b2) Delta^2;
             w += lr * m / (sqrt(v) + tau)                          (Reddi et al. 2021)
    """

    def __init__(self, kind: str, lr: float, momentum: float = 0.9, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        self.kind, self.lr, self.momentum, self.beta1, self.beta2, self.tau = kind, lr, momentum, beta1, beta2, tau
        self.state: dict[str, torch.Tensor] = {}

    def step(self, w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if self.kind == "fedavg":
            return w + self.lr * delta
        if self.kind == "fedavgm":
            m = self.state.get("m", torch.zeros_like(w))
            m = self.momentum * m + delta
            self.state["m"] = m
            return w + self.lr * m
        if self.kind == "fedadam":
            m = self.state.get("m", torch.zeros_like(w))
            v = self.state.get("v", torch.zeros_like(w))
            m = self.beta1 * m + (1 - self.beta1) * delta
            v = self.beta2 * v + (1 - self.beta2) * delta * delta
            self.state["m"], self.state["v"] = m, v
            return w + self.lr * m / (v.sqrt() + self.tau)
        raise ValueError(f"unknown server optimizer {self.kind}")
