"""The communication graph of SecAgg+ (Bell et al., CCS 2020).

Each client shares its secrets with, and masks against, only its neighbours in a
k-regular graph: the Harary graph H(k, n) (each node linked to the k/2 nearest on a
ring) over a uniformly random labelling of the cohort, as in Bell et al. Section 3,
drawn from OS randomness once the cohort is fixed (never from the run's seed).
Small cohorts use the complete graph (SecAgg of Bonawitz et al. 2017).

Parameters. Shares of a client's secrets go to its k neighbours and itself (k + 1
shares, as in Bonawitz et al. and Flower), t of them reconstruct. For a stated
fraction gamma of corrupt and delta of dropped clients, :func:`choose_degree` picks
the smallest even k and a t > (k + 1) / 2 such that, by a union bound over the n
clients with exact binomial tails (neighbours corrupt / dropped independently),

    n * P[Bin(k, gamma) >= t]        <= 2^-security_bits   (corrupt neighbours never hold t shares)
    n * P[Bin(k + 1, 1 - delta) < t] <= failure_probability (a neighbourhood keeps t survivors)

These are the two per-neighbourhood conditions of Bell et al.'s analysis; their
additional connectivity argument is not re-derived here (a random Harary graph with
these k is connected after the removals with overwhelming probability, and a
disconnected survivor set only makes the round abort, never leak: each mask is
still removed only with t shares). If no k < n - 1 works, the graph is complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets

import torch


def harary(n: int, k: int) -> list[set[int]]:
    """Neighbour sets (by position) of the Harary graph H(k, n); k even, or n even for odd k."""
    if k >= n - 1:
        return [set(range(n)) - {i} for i in range(n)]
    nb = [set() for _ in range(n)]
    for i in range(n):
        for j in range(1, k // 2 + 1):
            nb[i].update({(i + j) % n, (i - j) % n})
        if k % 2:
            nb[i].add((i + n // 2) % n)
    return nb


def neighbour_graph(ids: list[int], k: int, generator: torch.Generator | None = None) -> dict[int, set[int]]:
    """H(k, n) over a uniformly random labelling of ``ids``.

    The labelling comes from fresh OS randomness (``secrets.SystemRandom``, a
    Fisher-Yates shuffle) drawn *after* the cohort is fixed, so nobody can predict
    from the seed and the round who will be whose neighbour and place a coalition
    next to a target in advance (review finding 8). The server sends each client
    its neighbour list in SETUP and commits to the whole graph in the round's record
    (:func:`graph_digest`). ``generator`` pins the labelling for tests only; the
    protocol never passes one.
    """
    if generator is None:
        perm = list(range(len(ids)))
        secrets.SystemRandom().shuffle(perm)
    else:
        perm = torch.randperm(len(ids), generator=generator).tolist()
    order = [ids[p] for p in perm]
    nb = harary(len(ids), k)
    return {order[i]: {order[j] for j in nb[i]} for i in range(len(ids))}


def graph_digest(graph: dict[int, set[int]]) -> str:
    """SHA-256 of the graph's canonical JSON: the server's commitment to the round's graph."""
    canon = json.dumps({str(u): sorted(v) for u, v in sorted(graph.items())}, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def threshold_for(k: int, fraction: float) -> int:
    """t over k + 1 shares: at least a strict majority, and at least ceil(fraction * (k + 1))."""
    return max((k + 1) // 2 + 1, math.ceil(fraction * (k + 1) - 1e-12))


def binom_sf(t: int, k: int, p: float) -> float:
    """P[Bin(k, p) >= t], summed exactly term by term (k is at most a few hundred)."""
    return sum(math.comb(k, i) * p**i * (1 - p) ** (k - i) for i in range(max(t, 0), k + 1))


def security_ok(n: int, k: int, t: int, corrupt_fraction: float, security_bits: int) -> bool:
    return n * binom_sf(t, k, corrupt_fraction) <= 2.0 ** -security_bits


def recovery_ok(n: int, k: int, t: int, dropout_fraction: float, failure_probability: float) -> bool:
    return n * (1 - binom_sf(t, k + 1, 1 - dropout_fraction)) <= failure_probability


def choose_degree(n: int, corrupt_fraction: float, dropout_fraction: float, failure_probability: float,
                  security_bits: int, threshold_fraction: float = 0.5) -> tuple[int, int]:
    """(k, t) for n clients; k = n - 1 means the complete graph."""
    for k in range(2, n - 1, 2):
        for t in range(threshold_for(k, threshold_fraction), k + 2):
            if not security_ok(n, k, t, corrupt_fraction, security_bits):
                continue
            if recovery_ok(n, k, t, dropout_fraction, failure_probability):
                return k, t
            break  # larger t only hurts recovery
    k = max(n - 1, 1)
    return k, threshold_for(k, threshold_fraction)
