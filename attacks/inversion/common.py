"""What every inversion observer does before it attacks, in one place.

The ground-truth check (the engine's evaluation-only record, :mod:`secfed.truth`), the model at
the weights the clients started the round from, and the rows the observer attacks. Used by
:mod:`attacks.inversion.observer` (DLG / iDLG / IG), :mod:`attacks.inversion.text`,
:mod:`attacks.inversion.dager_lm` (DAGER) and :mod:`attacks.inversion.imprint`.
"""

from __future__ import annotations

from typing import Any

from secfed.truth import chosen_rows

#: the status an observer reports when it has nothing to score against
NO_TRUTH = ("no ground truth: the engine kept no record of the clients' batches (over Flower, or a trainer "
            "that reports none)")


def missing_truth(truth: Any) -> bool:
    """No record (over Flower) or a trainer that reports no batches."""
    return truth is None or not truth.clients


def model_before(view: Any, *, eval_mode: bool = True) -> Any:
    """The task's model at ``view.global_before`` (w_{t-1} as shipped: the point the clients' gradients were taken at)."""
    model = view.task.build_model()
    view.spec.assign(model, view.global_before)
    if eval_mode:
        model.eval()
    return model


def attacked_rows(view: Any, truth: Any, clients: list[int], max_clients: int) -> tuple[list[int], list[int]]:
    """(the ids of the view's update rows, the chosen ones that the ground truth covers)."""
    ids = list(view.update_ids or [])
    return ids, [u for u in chosen_rows(ids, clients, max_clients) if truth.has(u)]
