"""``FlowerEngine._exchange``: push, then pull replies at a short, growing interval (flwr 1.41's
``send_and_receive`` sleeps 3 s between pulls, which made every message exchange cost >= 3 s)."""

from __future__ import annotations

import time
from types import SimpleNamespace

from secfed.flower.server import FlowerEngine


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


def test_replies_are_collected_quickly_and_once():
    grid = PollingGrid([0, 2, 5])
    t0 = time.monotonic()
    replies = FlowerEngine._exchange(SimpleNamespace(grid=grid), ["a", "b", "c"], timeout=30)
    assert sorted(r.i for r in replies) == [0, 1, 2]
    assert grid.pulls == 6
    assert time.monotonic() - t0 < 1.5  # five short sleeps, not 5 x 3 s


def test_timeout_returns_what_arrived():
    grid = PollingGrid([0, 10**9])
    t0 = time.monotonic()
    replies = FlowerEngine._exchange(SimpleNamespace(grid=grid), ["a", "b"], timeout=0.3)
    assert [r.i for r in replies] == [0]
    assert time.monotonic() - t0 < 1.5


def test_no_messages_and_blocking_only_grids():
    assert FlowerEngine._exchange(SimpleNamespace(grid=None), [], timeout=1) == []
    blocking = SimpleNamespace(send_and_receive=lambda msgs, timeout=None: list(msgs))
    assert FlowerEngine._exchange(SimpleNamespace(grid=blocking), [1, 2], timeout=1) == [1, 2]
