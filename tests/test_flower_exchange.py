"""``FlowerEngine._exchange``: push, then pull replies at a short, growing interval (flwr 1.41's
``send_and_receive`` sleeps 3 s between pulls, which made every message exchange cost >= 3 s)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import secfed.flower.server as server_mod
from secfed.flower.server import FlowerEngine


class FakeClock:
    """``time`` for ``secfed.flower.server``: sleeping advances a virtual clock, so the tests measure the
    waits the code asks for (deterministic), never the wall clock of a loaded CI machine."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(server_mod, "time", c)
    return c


class PollingGrid:
    """Replies to message i become available after ``ready_after[i]`` pulls; counts the pulls."""

    def __init__(self, ready_after: list[int]) -> None:
        self.ready_after = ready_after
        self.pulls = 0
        self.sent: set[str] = set()

    def push_messages(self, msgs):
        ids = [f"m{i}" for i in range(len(msgs))]
        self.sent.update(ids)
        return ids

    def pull_messages(self, ids):
        self.pulls += 1
        out = []
        for mid in sorted(ids):
            i = int(mid[1:])
            if mid in self.sent and self.pulls > self.ready_after[i]:
                self.sent.discard(mid)
                out.append(SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid), i=i))
        return out


def test_replies_are_collected_quickly_and_once(clock):
    grid = PollingGrid([0, 2, 5])
    replies = FlowerEngine._exchange(SimpleNamespace(grid=grid), ["a", "b", "c"], timeout=30)
    assert sorted(r.i for r in replies) == [0, 1, 2]
    assert grid.pulls == 6
    # five short, growing sleeps (0.02 s x 1.5^k, k < 5: 0.26 s in all), not 5 x 3 s
    assert len(clock.slept) == 5 and clock.slept == sorted(clock.slept) and sum(clock.slept) < 0.3


def test_timeout_returns_what_arrived(clock):
    grid = PollingGrid([0, 10**9])
    replies = FlowerEngine._exchange(SimpleNamespace(grid=grid), ["a", "b"], timeout=0.3)
    assert [r.i for r in replies] == [0]
    assert abs(sum(clock.slept) - 0.3) < 1e-9  # waits exactly until the deadline, then stops
    assert max(clock.slept) <= server_mod.POLL_MAX


def test_no_messages_and_blocking_only_grids():
    assert FlowerEngine._exchange(SimpleNamespace(grid=None), [], timeout=1) == []
    blocking = SimpleNamespace(send_and_receive=lambda msgs, timeout=None: list(msgs))
    assert FlowerEngine._exchange(SimpleNamespace(grid=blocking), [1, 2], timeout=1) == [1, 2]
