"""Model poisoning: malicious clients rewrite their update after local training.

Each class declares whether it is omniscient (``needs = Need.HONEST_ROWS``: it sees the
round's honest updates, which the engine then passes to ``poison_updates``). The statistic-based attacks
(ALIE, IPM, Min-Max, Min-Sum) take ``omniscient`` as an argument: when False they
estimate the honest mean and spread from their own clients' honestly trained
updates, as Baruch et al. (2019) assume. All malicious clients of a round send
the same vector unless stated otherwise. Randomness: ``ctx.generator(...)``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Sequence

import torch

from attacks.poisoning.base import PoisoningAdversary, replace, stack
from attacks.poisoning.data import Backdoor
from defenses.robust import pairwise_sq_dists
from secfed.interfaces import ClientUpdate, RoundContext
from secfed.needs import Need, call_aggregator


def _reference(malicious: list[ClientUpdate], honest: list[ClientUpdate]) -> torch.Tensor:
    """The updates the attacker computes statistics on: the honest ones if it sees them, else its own."""
    return stack(honest) if honest else stack(malicious)


class SignFlip(PoisoningAdversary):
    """Sign flipping (Allen-Zhu et al. 2021; Li et al. 2019): each malicious client sends
    ``-scale * delta_i``, its own honest update reversed. Not omniscient.

    ByzFL's ``SignFlipping`` sends ``-mean(honest)`` instead (omniscient)."""

    def __init__(self, fraction: float = 0.2, ids: Sequence[int] | None = None, scale: float = 1.0,
                 num_clients: int | None = None, seed: int = 0) -> None:
        super().__init__(fraction, ids, num_clients, seed)
        self.scale = float(scale)

    def poison_updates(self, malicious: list[ClientUpdate], honest: list[ClientUpdate], ctx: RoundContext) -> list[ClientUpdate]:
        return replace(malicious, [-self.scale * u.delta for u in malicious])


class GaussianNoise(PoisoningAdversary):
    """Gaussian attack: each malicious client sends an independent draw of ``N(mean, std^2 I)``
    (as ByzFL's ``Gaussian(mu, sigma)``). Not omniscient."""

    def __init__(self, fraction: float = 0.2, ids: Sequence[int] | None = None, mean: float = 0.0, std: float = 1.0,
                 num_clients: int | None = None, seed: int = 0) -> None:
        super().__init__(fraction, ids, num_clients, seed)
        if std < 0:
            raise ValueError("gaussian: std must be >= 0")
        self.mean, self.std = float(mean), float(std)

    def poison_updates(self, malicious: list[ClientUpdate], honest: list[ClientUpdate], ctx: RoundContext) -> list[ClientUpdate]:
        rows = [self.mean + self.std * torch.randn(u.delta.shape, generator=ctx.generator("gaussian", u.client_id))
                for u in malicious]
        return replace(malicious, rows)


class ModelReplacement(Backdoor):
    """Model replacement (Bagdasaryan et al., AISTATS 2020): train on backdoored data
    (:class:`Backdoor`), then send ``gamma * delta_i`` with ``gamma = n / eta`` so that the
    backdoored model survives averaging. ``scale`` overrides gamma; by default
    ``n`` is the round's cohort and ``eta = server_lr``. A norm bound (NormBound,
    StaticClip, DP clipping) undoes the scaling. Not omniscient."""

    def __init__(self, fraction: float = 0.2, ids: Sequence[int] | None = None, scale: float | None = None,
                 server_lr: float = 1.0, backdoor: bool = True, target: int = 0, poison_fraction: float = 0.5,
                 trigger_size: int = 2, trigger_text: str = "cf mn bb", tokenizer: str = "minilm",
                 num_clients: int | None = None, seed: int = 0) -> None:
        super().__init__(fraction, ids, target, poison_fraction, trigger_size, trigger_text, tokenizer, num_clients, seed)
        if server_lr <= 0:
            raise ValueError("scaling: server_lr must be > 0")
        self.scale, self.server_lr, self.backdoor = scale, float(server_lr), bool(backdoor)

    def poison_data(self, client_id: int, data):  # type: ignore[override]
        return super().poison_data(client_id, data) if self.backdoor else data

    def gamma(self, ctx: RoundContext) -> float:
        return float(self.scale) if self.scale is not None else len(ctx.cohort) / self.server_lr

    def poison_updates(self, malicious: list[ClientUpdate], honest: list[ClientUpdate], ctx: RoundContext) -> list[ClientUpdate]:
        g = self.gamma(ctx)
        return replace(malicious, [g * u.delta for u in malicious], scale=g)


class _StatisticAttack(PoisoningAdversary, ABC):
    """Base of the attacks that send one vector computed from the honest statistics."""

    def __init__(self, fraction: float = 0.2, ids: Sequence[int] | None = None, omniscient: bool = True,
                 num_clients: int | None = None, seed: int = 0) -> None:
        super().__init__(fraction, ids, num_clients, seed)
        self.needs = Need.HONEST_ROWS if omniscient else Need.NONE

    @abstractmethod
    def craft(self, G: torch.Tensor, n: int, f: int, ctx: RoundContext) -> torch.Tensor:
        """The malicious vector from the reference updates G (k, d), cohort size n and f attackers."""

    def poison_updates(self, malicious: list[ClientUpdate], honest: list[ClientUpdate], ctx: RoundContext) -> list[ClientUpdate]:
        G = _reference(malicious, honest)
        n = len(malicious) + len(honest) if honest else len(ctx.cohort)
        v = self.craft(G, n, len(malicious), ctx)
        return replace(malicious, [v] * len(malicious))


def alie_z(n: int, f: int) -> float:
    """Baruch et al. (2019): ``s = floor(n/2 + 1) - f``, ``z_max = Phi^-1((n - s) / n)``."""
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    p = min(max(p, 1e-12), 1 - 1e-12)
    return float(torch.special.ndtri(torch.tensor(p, dtype=torch.float64)))


class ALIE(_StatisticAttack):
    """A Little Is Enough (Baruch, Baruch & Goldberg, NeurIPS 2019): every malicious client sends
    ``mu + sign * z_max * sigma`` per coordinate, with mu, sigma the mean and standard
    deviation (``ddof=1``) of the honest updates and ``z_max`` from the paper's formula
    (:func:`alie_z`, n = clients in the round, f = malicious ones in it).

    Sign: ``-1`` by default (``mu - z sigma``, as in Karimireddy et al.'s code and
    REFERENCES.md). ByzFL's ``ALittleIsEnough(tau=1.5)`` uses ``mu + tau sigma`` with a
    fixed tau; ``z=1.5, sign=1`` reproduces it.
    """

    def __init__(self, fraction: float = 0.2, ids: Sequence[int] | None = None, z: float | None = None,
                 sign: int = -1, ddof: int = 1, omniscient: bool = True, num_clients: int | None = None,
                 seed: int = 0) -> None:
        super().__init__(fraction, ids, omniscient, num_clients, seed)
        if sign not in (-1, 1) or ddof not in (0, 1):
            raise ValueError("alie: sign must be -1 or 1, ddof 0 or 1")
        self.z, self.sign, self.ddof = z, sign, ddof

    def craft(self, G: torch.Tensor, n: int, f: int, ctx: RoundContext) -> torch.Tensor:
        z = self.z if self.z is not None else alie_z(n, f)
        sigma = G.std(0, correction=self.ddof) if len(G) > self.ddof else torch.zeros(G.shape[1])
        ctx.metrics["alie_z"] = z
        return G.mean(0) + self.sign * z * sigma


class IPM(_StatisticAttack):
    """Inner-product manipulation (Xie, Koyejo & Gupta, UAI 2019): ``-epsilon * mean(honest)``.
    Small epsilon (0.1) evades distance-based rules; large epsilon flips a plain mean.
    ByzFL's ``InnerProductManipulation(tau)`` is the same with tau = epsilon."""

    def __init__(self, fraction: float = 0.2, ids: Sequence[int] | None = None, epsilon: float = 0.1,
                 omniscient: bool = True, num_clients: int | None = None, seed: int = 0) -> None:
        super().__init__(fraction, ids, omniscient, num_clients, seed)
        self.epsilon = float(epsilon)

    def craft(self, G: torch.Tensor, n: int, f: int, ctx: RoundContext) -> torch.Tensor:
        return -self.epsilon * G.mean(0)


def direction(G: torch.Tensor, kind: str) -> torch.Tensor:
    """Shejwalkar & Houmansadr's perturbation directions: ``unit`` = -mu/||mu||, ``std`` = -sigma, ``sign`` = -sign(mu)."""
    mu = G.mean(0)
    if kind == "unit":
        return -mu / torch.linalg.vector_norm(mu).clamp_min(1e-12)
    if kind == "std":
        return -(G.std(0, correction=1) if len(G) > 1 else torch.zeros_like(mu))
    if kind == "sign":
        return -torch.sign(mu)
    raise ValueError(f"unknown perturbation {kind!r} (unit, std, sign)")


class MinMax(_StatisticAttack):
    """Min-Max (Shejwalkar & Houmansadr, NDSS 2021, AGR-agnostic): send ``mu + gamma p`` with
    the largest gamma such that ``max_i ||mu + gamma p - g_i||^2 <= max_{i,j} ||g_i - g_j||^2``.

    The paper finds gamma by a halving search; each constraint is a quadratic in gamma,
    so secfed solves it in closed form, ``gamma = min_i (-b_i + sqrt(b_i^2 - c (a_i - T))) / c``
    with ``a_i = ||mu - g_i||^2``, ``b_i = <mu - g_i, p>``, ``c = ||p||^2``: the value the
    search converges to."""

    def __init__(self, fraction: float = 0.2, ids: Sequence[int] | None = None, perturbation: str = "std",
                 omniscient: bool = True, num_clients: int | None = None, seed: int = 0) -> None:
        super().__init__(fraction, ids, omniscient, num_clients, seed)
        self.perturbation = perturbation
        direction(torch.zeros(2, 1), perturbation)  # validate the name early

    def gamma(self, G: torch.Tensor, p: torch.Tensor) -> float:
        mu = G.mean(0)
        R = mu[None, :] - G
        a, b, c = (R * R).sum(1).double(), (R @ p).double(), float(p @ p)
        T = float(pairwise_sq_dists(G).max())
        if c <= 0:
            return 0.0
        roots = (-b + torch.sqrt((b * b - c * (a - T)).clamp_min(0.0))) / c
        return max(float(roots.min()), 0.0)

    def craft(self, G: torch.Tensor, n: int, f: int, ctx: RoundContext) -> torch.Tensor:
        p = direction(G, self.perturbation)
        g = self.gamma(G, p)
        ctx.metrics["minmax_gamma"] = g
        return G.mean(0) + g * p


class MinSum(MinMax):
    """Min-Sum (Shejwalkar & Houmansadr 2021): the largest gamma with
    ``sum_i ||mu + gamma p - g_i||^2 <= max_i sum_j ||g_i - g_j||^2``.

    Since ``sum_i (mu - g_i) = 0`` the constraint is ``A + h c gamma^2 <= T`` (h honest
    updates, ``A = sum_i ||mu - g_i||^2``), so ``gamma = sqrt((T - A) / (h c))`` exactly."""

    def gamma(self, G: torch.Tensor, p: torch.Tensor) -> float:
        h = G.shape[0]
        R = G.mean(0)[None, :] - G
        A = float((R * R).sum())
        T = float(pairwise_sq_dists(G).sum(1).max())
        c = float(p @ p)
        if c <= 0:
            return 0.0
        return math.sqrt(max(T - A, 0.0) / (h * c))

    def craft(self, G: torch.Tensor, n: int, f: int, ctx: RoundContext) -> torch.Tensor:
        p = direction(G, self.perturbation)
        g = self.gamma(G, p)
        ctx.metrics["minsum_gamma"] = g
        return G.mean(0) + g * p


class Mimic(PoisoningAdversary):
    """Mimic (Karimireddy, He & Jaggi, ICLR 2022): every malicious client copies one honest
    client's update, over-representing it (harmful under non-IID data). Omniscient.

    ``target`` indexes the round's honest updates in client-id order (as ByzFL's
    ``Mimic(epsilon)``); the paper picks the worker along the top principal direction
    after a warm-up, which ``target="pca"`` does per round."""

    needs = Need.HONEST_ROWS

    def __init__(self, fraction: float = 0.2, ids: Sequence[int] | None = None, target: int | str = 0,
                 num_clients: int | None = None, seed: int = 0) -> None:
        super().__init__(fraction, ids, num_clients, seed)
        if not (isinstance(target, int) and target >= 0) and target != "pca":
            raise ValueError("mimic: target must be a non-negative index or 'pca'")
        self.target = target

    def poison_updates(self, malicious: list[ClientUpdate], honest: list[ClientUpdate], ctx: RoundContext) -> list[ClientUpdate]:
        pool = sorted(honest or malicious, key=lambda u: u.client_id)
        G = stack(pool)
        if self.target == "pca":
            C = G - G.mean(0)
            # top right-singular direction through the small n x n Gram matrix
            evals, evecs = torch.linalg.eigh((C @ C.T).double())
            v = (evecs[:, -1].to(C.dtype) @ C)
            i = int(torch.argmax((C @ v).abs()))
        else:
            i = int(self.target) % len(pool)
        ctx.metrics["mimic_client"] = pool[i].client_id
        return replace(malicious, [pool[i].delta] * len(malicious))


class Adaptive(PoisoningAdversary):
    """An adaptive attacker that knows the defence (Shejwalkar & Houmansadr 2021, AGR-tailored;
    the same objective as ByzFL's ``Optimal_ALittleIsEnough``/``Optimal_InnerProductManipulation``).

    It builds the server's pre-aggregators and aggregator from their config
    (``aggregator``, ``pre_aggregators``, same syntax as ``server.*``), then for each
    perturbation direction p in ``directions`` and each gamma in ``gammas`` sends
    ``mu + gamma p`` from all malicious clients and keeps the candidate that maximises
    ``||AGR(honest + malicious) - mean(honest)||``. Omniscient. Uses the engine's
    carried center for CenteredClipping; for FLTrust it assumes the server's root
    update equals the honest mean (it cannot see the root data).
    """

    needs = Need.HONEST_ROWS

    def __init__(self, fraction: float = 0.2, ids: Sequence[int] | None = None, aggregator: Any = "median",
                 pre_aggregators: Sequence[Any] = (), directions: Sequence[str] = ("std", "unit", "sign"),
                 gammas: Sequence[float] | None = None, num_clients: int | None = None, seed: int = 0) -> None:
        super().__init__(fraction, ids, num_clients, seed)
        from secfed import registry
        from secfed.config import PluginSpec

        def spec(x: Any) -> PluginSpec:
            return PluginSpec(name=x) if isinstance(x, str) else PluginSpec(**dict(x))

        ctx = {"num_clients": num_clients, "seed": seed}
        self.agg = registry.build("aggregator", spec(aggregator), "attack.adversary.aggregator", **ctx)
        self.pre = [registry.build("pre_aggregator", spec(p), f"attack.adversary.pre_aggregators[{i}]", **ctx)
                    for i, p in enumerate(pre_aggregators)]
        for d in directions:
            direction(torch.zeros(2, 1), d)
        self.directions = tuple(directions)
        self.gammas = tuple(float(g) for g in gammas) if gammas is not None else (0.0,) + tuple(2.0 ** k for k in range(-4, 9))

    def _aggregate(self, X: torch.Tensor, ctx: RoundContext, mu: torch.Tensor) -> torch.Tensor:
        """The server's aggregation as the engine runs it (secfed.needs.call_aggregator): the pre-aggregators,
        then the aggregator with the inputs it declares (the carried center; mu standing in for the root update)."""
        return call_aggregator(self.agg, self.pre, X, None, center=lambda: ctx.state.get("center", torch.zeros(X.shape[1])),
                               reference=lambda: mu)

    def poison_updates(self, malicious: list[ClientUpdate], honest: list[ClientUpdate], ctx: RoundContext) -> list[ClientUpdate]:
        G = _reference(malicious, honest)
        mu = G.mean(0)
        f = len(malicious)
        best, best_v, best_cfg = -1.0, mu, ("none", 0.0)
        for d in self.directions:
            p = direction(G, d)
            for g in self.gammas:
                v = mu + g * p
                X = torch.cat([G, v.expand(f, -1)]) if honest else v.expand(f, -1).clone()
                try:
                    out = self._aggregate(X, ctx, mu)
                except ValueError:
                    continue
                dev = float(torch.linalg.vector_norm(out - mu))
                if dev > best:
                    best, best_v, best_cfg = dev, v, (d, g)
        ctx.metrics["adaptive_direction"], ctx.metrics["adaptive_gamma"] = best_cfg
        return replace(malicious, [best_v] * f)
