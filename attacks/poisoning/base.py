"""What every poisoning adversary shares: which clients it controls.

``fraction`` of the population (a seeded choice) or an explicit list ``ids``.
``needs`` (secfed.needs) says whether the attacker sees the honest updates of the round:
``Need.HONEST_ROWS`` (omniscient; the engine then passes them to ``poison_updates``,
in-process only) or ``Need.NONE``; a non-omniscient model
attacker estimates the honest statistics from its own clients' honestly
trained updates instead.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from secfed.interfaces import ClientUpdate, derive_seed
from secfed.needs import Need


class PoisoningAdversary:
    """Base class: picks the malicious clients; subclasses add ``poison_data`` / ``poison_updates``."""

    needs = Need.NONE  # Need.HONEST_ROWS: an omniscient attacker (secfed.needs)
    # True: the clients it names train honestly (a secret holder whose data an audit probes later, e.g. the
    # secret sharer); the run's accuracy is an honest run's, and reports treat it as the setup's utility.
    honest = False

    def __init__(self, fraction: float = 0.2, ids: Sequence[int] | None = None, num_clients: int | None = None,
                 seed: int = 0) -> None:
        if ids is None and not 0 <= fraction <= 1:
            raise ValueError("fraction must be in [0, 1]")
        self.fraction = float(fraction)
        self.ids = None if ids is None else sorted({int(i) for i in ids})
        self.seed = int(seed)

    def malicious(self, num_clients: int, seed: int) -> set[int]:
        """``ids`` if given, else ``round(fraction * N)`` clients chosen by a seeded permutation."""
        if self.ids is not None:
            bad = [i for i in self.ids if not 0 <= i < num_clients]
            if bad:
                raise ValueError(f"malicious ids {bad} are outside 0..{num_clients - 1}")
            return set(self.ids)
        k = int(math.floor(self.fraction * num_clients + 0.5))
        g = torch.Generator().manual_seed(derive_seed(seed, "malicious"))
        return set(torch.randperm(num_clients, generator=g)[:k].tolist())


def stack(updates: list[ClientUpdate]) -> torch.Tensor:
    return torch.stack([u.delta for u in updates])


def replace(updates: list[ClientUpdate], rows: torch.Tensor | list[torch.Tensor], **metrics: Any) -> list[ClientUpdate]:
    """Copies of ``updates`` with their deltas replaced by ``rows`` (one per update)."""
    out = []
    for u, r in zip(updates, rows):
        out.append(ClientUpdate(u.client_id, r.detach().to(torch.float32).contiguous(), u.num_examples, u.weight,
                                {**u.metrics, **metrics}))
    return out
