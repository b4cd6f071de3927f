"""Ground truth kept outside the attacks: what each client really trained on, for evaluation only.

An attack observer scores its reconstruction against the examples a client used.
It must not *rebuild* them (re-running the trainer's batch schedule is wrong as soon
as the trainer draws its batches differently, e.g. DP-SGD's secret Poisson batches).
As in breaching's ``true_user_data`` (Geiping et al., "Inverting Gradients", 2020,
the evaluation record next to the attack), the trainer reports the example indices of
every local step into a :class:`GroundTruth` record that the engine keeps:

* :class:`secfed.rounds.ClientRound` passes a ``used`` list to the trainer's
  ``train(..., used=...)`` and files it here with the data the client trained on
  (after any poisoning);
* the engine resets the record every round and hands it (keyword ``truth=``) only to
  plug-ins that declare :attr:`secfed.needs.Need.GROUND_TRUTH` (evaluation observers,
  a simulated malicious server's ``recover``);
* it never goes into a :class:`~secfed.interfaces.ClientUpdate`, the wire, the round
  record or a checkpoint. A SuperNode keeps no record (its :class:`ClientRound` has
  none), so over Flower an evaluation observer finds no truth unless a simulation
  harness wires one in (``tests/test_parity_matrix.py``).

Group mode: the rows of a group sum are keyed by :class:`~secfed.interfaces.GroupId`,
not by a client id; :meth:`GroundTruth.of` resolves a group to its members' records,
so a group can never be scored against one client's data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from secfed.interfaces import GroupId


@dataclass
class ClientTruth:
    """One client's local training in one round: the data it trained on and each step's example indices."""

    client_id: int
    data: Any  # the TensorData the trainer saw (a malicious client's poisoned data, if any)
    steps: list[torch.Tensor]  # example indices of each local step, in order (an empty step: an empty tensor)

    def used(self) -> torch.Tensor:
        """The distinct examples used over all steps (sorted)."""
        nonempty = [s for s in self.steps if s.numel()]
        return torch.cat(nonempty).unique() if nonempty else torch.zeros(0, dtype=torch.long)

    def batch(self, step: int | None = None) -> dict[str, torch.Tensor]:
        """The examples of one step (``step``), or of all steps (``None``: :meth:`used`)."""
        idx = self.used() if step is None else self.steps[step]
        return self.data.batch(idx)


@dataclass
class GroundTruth:
    """The engine's evaluation record of one round (reset by :meth:`start`)."""

    round: int = 0
    clients: dict[int, ClientTruth] = field(default_factory=dict)

    def start(self, round: int) -> None:
        self.round, self.clients = round, {}

    def record(self, client_id: int, data: Any, steps: list[torch.Tensor]) -> None:
        self.clients[int(client_id)] = ClientTruth(int(client_id), data, [s.detach().clone().long() for s in steps])

    def of(self, uid: int | GroupId) -> list[ClientTruth]:
        """The records behind one row of ``SumResult.updates``: one client, or every member of a group.

        Raises KeyError for a client (or a group member) the record does not hold (it did not
        train this round, or its trainer reports no batches)."""
        if isinstance(uid, GroupId):
            return [self.clients[c] for c in uid.members]
        if isinstance(uid, bool) or not isinstance(uid, int):
            raise TypeError(f"a row id is a client id (int) or a GroupId, not {type(uid).__name__}")
        return [self.clients[uid]]

    def has(self, uid: int | GroupId) -> bool:
        members = uid.members if isinstance(uid, GroupId) else (uid,)
        return all(c in self.clients for c in members)


def chosen_rows(ids: list[int | GroupId], clients: list[int], max_clients: int) -> list[int | GroupId]:
    """The rows of ``SumResult.updates`` an observer attacks: those of ``clients`` (a group's row when one of
    its members is named), else the first ``max_clients``."""
    if not clients:
        return ids[:max_clients]
    wanted = set(clients)
    return [u for u in ids if (wanted & set(u.members) if isinstance(u, GroupId) else u in wanted)]
