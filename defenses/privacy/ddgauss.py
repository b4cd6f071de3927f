"""The distributed discrete Gaussian (DDGauss) under SecAgg+ (Kairouz, Liu & Steinke, ICML 2021).

Paper: P. Kairouz, Z. Liu, T. Steinke, "The Distributed Discrete Gaussian Mechanism for
Federated Learning with Secure Aggregation", ICML 2021 (arXiv:2102.06387), "KLS21" below.

Client i (``client.pipeline = [..., "clip", "ddgauss"]``, ``server.secure_sum = "secagg+"``):

1. clip: ||x_i||_2 <= c (the 'clip' stage before this one);
2. flatten (optional, ``rotate = true``): x <- H D x / sqrt(d') with x zero-padded to
   d' = 2^ceil(log2 d), H the Walsh-Hadamard matrix and D a diagonal of random signs
   drawn from a *public* per-round seed (the rotation is not privacy noise: the server
   knows it and inverts it); it spreads the vector so that no coordinate is large and
   the modular sum rarely wraps (KLS21 Sec. 4.2);
3. scale by 1/gamma (``scale`` = 1/gamma = a power of two, chosen below);
4. conditional randomised rounding (KLS21 Sec. 4.1, Prop. 22 / Thm. 1): each coordinate
   rounds to floor(x) + Bernoulli(x - floor(x)) (fresh OS randomness), repeated until
   ||k||_2 <= Delta_2 with
       Delta_2 = min( c/gamma + sqrt(d'),
                      sqrt( (c/gamma)^2 + d'/4 + sqrt(2 ln(1/beta)) (c/gamma + sqrt(d')/2) ) ),
   the second bound holding with probability >= 1 - beta per try (beta = exp(-1/2) default);
5. adds Y_i ~ N_Z(0, sigma^2)^d' from OS randomness (:mod:`defenses.privacy.discrete_gaussian`),
   sigma = z Delta_2 / sqrt(n), n = the fewest noise shares any released sum holds (below);
6. reduces mod m = 2^bits and hands those ring elements to SecAgg+ directly (no second
   quantisation; the secure sum's 2^32 / 2^64 ring reduces to Z_m because m divides it).

The server reads the unmasked ring sum mod m as signed integers in [-m/2, m/2), multiplies
by gamma, inverts the rotation and drops the padding: sum_i x_i + (rounding) + gamma *
sum_i Y_i, whose noise has std sqrt(n') sigma gamma for n' surviving clients.

Privacy (KLS21 Thm. 1 and Prop. 14 / Eq. 17, for sigma >= 1/2): the sum Z = sum_{i<=n} Y_i
of n discrete Gaussians N_Z(0, sigma^2)^d satisfies, for every integer shift with
||Delta||_2 <= Delta_2, ||Delta||_1 <= Delta_1 and every order alpha > 1,

    D_alpha(Z + Delta || Z) <= min{ alpha/2 s2^2 + tau d,
                                    alpha/2 (s2^2 + 2 s1 tau + tau^2 d),
                                    alpha/2 (s2 + sqrt(d) tau)^2 },
    s2 = Delta_2 / (sqrt(n) sigma),  s1 = Delta_1 / (sqrt(n) sigma),
    tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1)),

with Delta_1 <= Delta_2 min(sqrt(d), Delta_2) for integer vectors. Here sigma = z Delta_2 /
sqrt(n), so s2 = 1/z exactly: z is the equivalent noise multiplier of the central
Gaussian, and the tau terms are the price of the sum of discrete Gaussians not being one.

* Client sampling: amplification by Poisson subsampling with rate q by the general bound of
  Zhu & Wang (ICML 2019, "Poisson subsampled Renyi differential privacy", Thm. 6), valid
  for any mechanism with RDP eps(.) at integer orders alpha >= 2:
      eps'(alpha) <= 1/(alpha-1) log[ (1-q)^(alpha-1) (alpha q - q + 1)
                     + C(alpha,2) q^2 (1-q)^(alpha-2) e^eps(2)
                     + 3 sum_{l=3}^alpha C(alpha,l) q^l (1-q)^(alpha-l) e^((l-1) eps(l)) ],
  and min(eps', eps) is charged (as KLS21's experiments and TensorFlow Federated's
  ``ddgauss_epsilon`` do); rounds compose additively in RDP; (epsilon, delta) by the
  conversion of Balle et al. 2020 (Opacus' ``get_privacy_spent``). Against the server,
  which knows the cohort, q = 1.
* Dropouts: a SecAgg+ round releases a sum only of >= max(2, server.min_clients) clients
  (it aborts otherwise), so every released sum holds at least that many shares. The ledger
  charges that worst case: n = max(2, min_clients) - colluding (``colluding`` clients may
  reveal their shares to the server). No noise is added by the server: a round with more
  survivors carries more noise than charged (utility cost sqrt(n'/n)).
  Limitation, shared with KLS21's and TFF's accounting: the analysis fixes the number of
  shares in the sum; that a sampled user also brings its own share is not modelled (the
  extra share only adds noise to the larger dataset's output).
* Bit width: the ring sum wraps (utility loss, never a privacy loss: it is post-processing)
  when a coordinate leaves [-m/2, m/2). With rotation, by Hoeffding over the random signs,
  P[|(R v)_j| > a] <= 2 exp(-a^2 d' / (2 ||v||^2)) for the sum v = sum_i x_i, ||v|| <= N c;
  rounding adds < 1 per client; the noise sum is N sigma^2-subgaussian (CKS20, Cor. 9) so
  P[|noise_j| > b] <= 2 exp(-b^2 / (2 N sigma^2)). Union over d' coordinates, minimised
  over the split a + b = m/2 - N - 1 (N: the most clients a sum can hold). Without rotation
  the signal is bounded deterministically by N c / gamma. ``scale`` is the largest power of
  two for which this bound is <= ``max_wrap_probability`` (1e-9 default); a width for which
  even the coarsest useful grid wraps, or makes the rounding more than double the noise
  (Delta_2 > 2 c / gamma), is refused in one line.
"""

from __future__ import annotations

import functools
import math
import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from opacus.accountants.analysis import rdp as rdp_analysis
from scipy import special

from defenses.privacy import discrete_gaussian
from defenses.privacy.analysis import smallest_noise
from secfed.errors import ConfigError
from secfed.needs import DPRole

KEY = "client.pipeline.ddgauss"
#: integer RDP orders (Zhu & Wang's bound is for integer alpha)
ORDERS: tuple[int, ...] = tuple(range(2, 257))
#: beta of the conditional rounding (KLS21's experiments use exp(-1/2))
DEFAULT_BETA = math.exp(-0.5)
#: slack on the clip norm: float32 clipping and float64 rotation move ||x|| by far less
CLIP_SLACK = 1 + 2.0**-20


# ------------------------------------------------------------------ formulas (testable alone)


def rounded_l2_bound(scaled_clip: float, dim: int, beta: float) -> float:
    """Delta_2 after conditional randomised rounding of a vector of norm <= ``scaled_clip`` (KLS21 Thm. 1, Prop. 22)."""
    bound_1 = scaled_clip + math.sqrt(dim)
    if beta == 0:
        return bound_1
    sq = scaled_clip**2 + 0.25 * dim + math.sqrt(2.0 * math.log(1.0 / beta)) * (scaled_clip + 0.5 * math.sqrt(dim))
    return min(bound_1, math.sqrt(sq))


def rounded_l1_bound(delta2: float, dim: int) -> float:
    """Delta_1 <= Delta_2 min(sqrt(d), Delta_2): L1 <= sqrt(d) L2, and L1 <= L2^2 for integer vectors."""
    return delta2 * min(math.sqrt(dim), delta2)


def tau(sigma: float, shares: int) -> float:
    """tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1)) (KLS21 Thm. 1)."""
    return 10.0 * sum(math.exp(-2.0 * math.pi**2 * sigma**2 * k / (k + 1)) for k in range(1, shares))


def ddgauss_rdp(alpha: np.ndarray, s2: float, s1: float, tau_: float, dim: int) -> np.ndarray:
    """RDP of the sum of n discrete Gaussians at orders alpha (KLS21 Prop. 14 / Eq. 17); s2, s1 as in the module docstring."""
    alpha = np.asarray(alpha, dtype=np.float64)
    t1 = alpha / 2 * s2**2 + tau_ * dim
    t2 = alpha / 2 * (s2**2 + 2 * s1 * tau_ + tau_**2 * dim)
    t3 = alpha / 2 * (s2 + math.sqrt(dim) * tau_) ** 2
    return np.minimum(np.minimum(t1, t2), t3)


def poisson_subsampled_rdp(eps: np.ndarray, q: float) -> np.ndarray:
    """Zhu & Wang 2019 Thm. 6 at orders 2..len(eps)+1 from eps[alpha - 2] = the RDP of the mechanism; min with eps."""
    eps = np.asarray(eps, dtype=np.float64)
    if q >= 1:
        return eps.copy()
    if q <= 0:
        return np.zeros_like(eps)
    alpha = np.arange(2, eps.size + 2, dtype=np.float64)[:, None]  # rows: orders; columns: l = 0..max order
    l = np.arange(0, eps.size + 2, dtype=np.float64)[None, :]
    lq, l1q = math.log(q), math.log1p(-q)
    with np.errstate(invalid="ignore", divide="ignore"):
        log_comb = special.gammaln(alpha + 1) - special.gammaln(l + 1) - special.gammaln(alpha - l + 1)
        eps_l = np.concatenate([[0.0, 0.0], eps])[None, :]  # eps(l) for l >= 2
        terms = np.log(np.where(l == 2, 1.0, 3.0)) + log_comb + l * lq + (alpha - l) * l1q + (l - 1) * eps_l
    terms = np.where((l >= 2) & (l <= alpha), terms, -np.inf)
    terms[:, 0] = ((alpha - 1) * l1q + np.log(alpha * q - q + 1))[:, 0]  # the l = 0 and 1 terms together
    return np.minimum(special.logsumexp(terms, axis=1) / (alpha[:, 0] - 1), eps)


def fwht(x: np.ndarray) -> np.ndarray:
    """The (unnormalised, Sylvester) Walsh-Hadamard transform H x of a float64 vector of length 2^k."""
    n = x.size
    a = x.astype(np.float64, copy=True)
    h = 1
    while h < n:
        v = a.reshape(-1, 2, h)
        top, bottom = v[:, 0, :].copy(), v[:, 1, :]
        v[:, 0, :] += bottom
        v[:, 1, :] = top - bottom
        h *= 2
    return a


class Rotation:
    """x -> H D x / sqrt(d') and back (H symmetric, H H = d' I); D = random signs from a public seed."""

    def __init__(self, padded_dim: int, seed: int) -> None:
        rng = np.random.Generator(np.random.PCG64(seed))
        self.signs = rng.integers(0, 2, padded_dim).astype(np.float64) * 2 - 1
        self.norm = 1.0 / math.sqrt(padded_dim)

    def forward(self, x: np.ndarray) -> np.ndarray:
        return fwht(x * self.signs) * self.norm

    def inverse(self, y: np.ndarray) -> np.ndarray:
        return fwht(y) * self.norm * self.signs


# ------------------------------------------------------------------ the mechanism


@dataclass(frozen=True)
class DDGaussMechanism:
    """One round of DDGauss: grid, noise, sensitivity, wrap-around bound and RDP (module docstring).

    Args:
        clip_norm: c, the clients' L2 clip norm.
        dim: d, the number of coordinates of an update.
        noise_multiplier: z; the sum of ``shares`` shares has std z Delta_2 (grid units).
        shares: n, the fewest noise shares a released sum holds (max(2, min_clients) - colluding).
        max_clients: N, the most clients one sum can hold (for the wrap-around bound).
        bits: log2 m of the modular sum (<= 62).
        beta: of the conditional rounding, in [0, 1).
        rotate: randomised Hadamard flattening.
        max_wrap_probability: the bound on P[some coordinate wraps] the grid must meet.
    """

    clip_norm: float
    dim: int
    noise_multiplier: float
    shares: int
    max_clients: int
    bits: int = 32
    beta: float = DEFAULT_BETA
    rotate: bool = True
    max_wrap_probability: float = 1e-9
    scale: float = field(init=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.bits, int) and 8 <= self.bits <= 62):
            raise ConfigError(f"config key '{KEY}.bits': an integer in [8, 62] (got {self.bits!r})")
        if not 0 <= self.beta < 1:
            raise ConfigError(f"config key '{KEY}.beta': in [0, 1) (got {self.beta})")
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ConfigError(f"config key '{KEY}.noise_multiplier': must be a positive number (got {self.noise_multiplier})")
        if not (self.clip_norm > 0 and self.dim >= 1 and self.shares >= 1 and self.max_clients >= self.shares):
            raise ConfigError(f"config key '{KEY}': needs clip_norm > 0, dim >= 1 and 1 <= shares <= max clients "
                              f"(got c={self.clip_norm}, d={self.dim}, shares={self.shares}, max={self.max_clients})")
        object.__setattr__(self, "scale", self._choose_scale())
        if self.sigma < 0.5:  # KLS21 Thm. 1 assumes sigma >= 1/2
            raise ConfigError(f"config key '{KEY}': the local share is {self.sigma:.3g} grid steps (< 1/2); "
                              "raise noise_multiplier or bits")

    # -- derived quantities
    @property
    def padded_dim(self) -> int:
        return 1 << max(0, (self.dim - 1).bit_length()) if self.rotate else self.dim

    @property
    def gamma(self) -> float:
        return 1.0 / self.scale

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    @property
    def ring_bits(self) -> int:
        """The secure sum's ring: 2^32 or 2^64 (m divides it, so the sum mod m survives)."""
        return 32 if self.bits <= 32 else 64

    def _delta2(self, scale: float) -> float:
        return rounded_l2_bound(self.clip_norm * CLIP_SLACK * scale, self.padded_dim, self.beta)

    def _sigma(self, scale: float) -> float:
        return self.noise_multiplier * self._delta2(scale) / math.sqrt(self.shares)

    @property
    def delta2(self) -> float:
        return self._delta2(self.scale)

    @property
    def delta1(self) -> float:
        return rounded_l1_bound(self.delta2, self.padded_dim)

    @property
    def sigma(self) -> float:
        """The local share's sigma in grid units."""
        return self._sigma(self.scale)

    @property
    def tau(self) -> float:
        return tau(self.sigma, self.shares)

    @property
    def rounding_inflation(self) -> float:
        """Delta_2 / (c / gamma): how much the rounding raises the noise needed (1 = none)."""
        return self.delta2 / (self.clip_norm * self.scale)

    def wrap_probability(self, scale: float | None = None) -> float:
        """Upper bound on P[some coordinate of a sum of N clients wraps mod m] (module docstring)."""
        scale = self.scale if scale is None else scale
        n, d = self.max_clients, self.padded_dim
        room = self.modulus / 2 - n - 1
        if room <= 0:
            return 1.0
        noise_var = n * self._sigma(scale) ** 2
        signal = n * self.clip_norm * CLIP_SLACK * scale  # ||sum_i x_i|| / gamma
        if not self.rotate:
            b = room - signal
            return 1.0 if b <= 0 else min(1.0, d * 2 * math.exp(-b * b / (2 * noise_var)))
        best = 1.0
        for f in np.linspace(0.0, 1.0, 201)[1:-1]:
            a, b = f * room, (1 - f) * room
            p = d * (2 * math.exp(-a * a * d / (2 * signal * signal)) + 2 * math.exp(-b * b / (2 * noise_var)))
            best = min(best, p)
        return best

    def _choose_scale(self) -> float:
        """The largest power of two 1/gamma whose wrap bound meets max_wrap_probability (refuse if none is useful)."""
        hi = math.floor(math.log2(self.modulus / (self.clip_norm * CLIP_SLACK)))
        for j in range(hi, hi - 200, -1):
            s = 2.0**j
            if self._delta2(s) > 2 * self.clip_norm * s:
                break  # coarser grids only make the rounding dominate further
            if self.wrap_probability(s) <= self.max_wrap_probability:
                return s
        raise ConfigError(f"config key '{KEY}.bits': a {self.bits}-bit modular sum of up to {self.max_clients} clients "
                          f"(d = {self.padded_dim}, z = {self.noise_multiplier:.3g}) wraps with probability > "
                          f"{self.max_wrap_probability:g} at every grid where rounding costs < 2x noise; raise bits")

    # -- accounting
    def rdp(self, sample_rate: float = 1.0) -> np.ndarray:
        """RDP of one round at :data:`ORDERS`, amplified by Poisson sampling at ``sample_rate`` (Zhu & Wang Thm. 6)."""
        base = ddgauss_rdp(np.asarray(ORDERS), 1.0 / self.noise_multiplier,
                           self.delta1 / (math.sqrt(self.shares) * self.sigma), self.tau, self.padded_dim)
        return poisson_subsampled_rdp(base, sample_rate)

    def describe(self) -> dict[str, Any]:
        """What the ledger and the round metrics record about the mechanism."""
        return {"bits": self.bits, "ring_bits": self.ring_bits, "gamma": self.gamma, "padded_dim": self.padded_dim,
                "rotate": self.rotate, "beta": self.beta, "shares": self.shares, "max_clients": self.max_clients,
                "local_sigma": self.sigma, "delta2": self.delta2, "tau": self.tau,
                "rounding_inflation": self.rounding_inflation, "wrap_probability_bound": self.wrap_probability()}

    # -- encoding (client) and decoding (server)
    def rotation(self, seed: int) -> Rotation | None:
        return Rotation(self.padded_dim, seed) if self.rotate else None

    def encode(self, x: np.ndarray, rotation: Rotation | None, max_tries: int = 1000) -> np.ndarray:
        """The (d' + 1,) ring vector of one client: (rint_cond(R x / gamma) + Y mod m, 1). ``x``: the clipped update."""
        v = np.zeros(self.padded_dim, dtype=np.float64)
        v[: x.size] = x
        if rotation is not None:
            v = rotation.forward(v)
        v *= self.scale
        rng = np.random.default_rng(secrets.randbits(128))  # rounding coins: OS randomness
        lo = np.floor(v)
        frac = v - lo
        bound2 = self.delta2**2
        for _ in range(max_tries):
            k = lo + (rng.random(v.size) < frac)
            if float(np.dot(k, k)) <= bound2:
                break
        else:  # probability <= beta^max_tries: treated as the client's crash (it drops out)
            raise RuntimeError("ddgauss: conditional rounding did not meet its norm bound")
        ints = k.astype(np.int64) + discrete_gaussian.sample(self.sigma, v.size)
        out = np.empty(self.padded_dim + 1, dtype=np.uint32 if self.ring_bits == 32 else np.uint64)
        out[:-1] = np.mod(ints, self.modulus).astype(out.dtype)
        out[-1] = 1
        return out

    def decode(self, ring_sum: np.ndarray, rotation: Rotation | None) -> tuple[np.ndarray, int]:
        """(sum_i x_i + noise as float64 (d,), number of clients) from the unmasked ring sum."""
        v = ring_sum[:-1].astype(np.uint64) & np.uint64(self.modulus - 1)
        signed = v.astype(np.int64)
        signed[signed >= self.modulus // 2] -= self.modulus
        y = signed.astype(np.float64) * self.gamma
        if rotation is not None:
            y = rotation.inverse(y)
        return y[: self.dim], int(ring_sum[-1])


@dataclass
class RoundCodec:
    """The public part of one round's DDGauss encoding that client and server share: mechanism + rotation seed."""

    mechanism: DDGaussMechanism
    seed: int

    def __post_init__(self) -> None:
        self._rotation = self.mechanism.rotation(self.seed)

    @property
    def bits(self) -> int:
        return self.mechanism.bits

    @property
    def ring_bits(self) -> int:
        return self.mechanism.ring_bits

    @property
    def ring_dim(self) -> int:
        return self.mechanism.padded_dim + 1

    def encode(self, x: np.ndarray) -> np.ndarray:
        return self.mechanism.encode(x, self._rotation)

    def decode(self, ring_sum: np.ndarray) -> tuple[np.ndarray, int]:
        return self.mechanism.decode(ring_sum, self._rotation)


@dataclass
class RingInput:
    """What a DDGauss client hands the secure sum: ring elements (summed as they are) and their codec."""

    values: np.ndarray
    codec: RoundCodec


# ------------------------------------------------------------------ the accountant


class DDGaussAccountant:
    """Epsilon of a composition of DDGauss rounds (Opacus-style: a history of (z, q, steps) triples).

    Every round's mechanism shares (c, d, n, N, bits, beta, rotate); z picks the noise. RDP is
    summed over rounds at integer orders 2..256 and converted to (epsilon, delta).
    """

    def __init__(self, clip_norm: float, dim: int, shares: int, max_clients: int, bits: int = 32,
                 beta: float = DEFAULT_BETA, rotate: bool = True, max_wrap_probability: float = 1e-9) -> None:
        self.params = dict(clip_norm=float(clip_norm), dim=int(dim), shares=int(shares), max_clients=int(max_clients),
                           bits=int(bits), beta=float(beta), rotate=bool(rotate),
                           max_wrap_probability=float(max_wrap_probability))

    @functools.lru_cache(maxsize=256)
    def mechanism(self, noise_multiplier: float) -> DDGaussMechanism:
        return DDGaussMechanism(noise_multiplier=float(noise_multiplier), **self.params)

    @functools.lru_cache(maxsize=1024)
    def _rdp(self, z: float, q: float) -> np.ndarray:
        return self.mechanism(z).rdp(q)

    def epsilon(self, history: list[tuple[float, float, int]], delta: float) -> float:
        rdp = np.zeros(len(ORDERS))
        for z, q, steps in history:
            if steps > 0 and q > 0:
                rdp = rdp + self._rdp(float(z), float(q)) * int(steps)
        if not np.any(rdp):
            return 0.0
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=delta)
        return float(eps)

    def calibrate(self, target_epsilon: float, delta: float, sample_rate: float, rounds: int,
                  key: str = "server.privacy") -> float:
        """The smallest z (to 0.1%) with epsilon((z, q, rounds)) <= target."""
        return smallest_noise(lambda z: self.epsilon([(z, sample_rate, rounds)], delta), target_epsilon, delta, key,
                              "ddgauss at this sampling rate and number of rounds")

    def max_rounds(self, target_epsilon: float, delta: float, z: float, sample_rate: float,
                   key: str = "server.privacy") -> int:
        """The largest T with epsilon((z, q, T)) <= target (ConfigError if not even one round fits)."""
        if self.epsilon([(z, sample_rate, 1)], delta) > target_epsilon:
            raise ConfigError(f"config key '{key}.epsilon': a single ddgauss round already exceeds epsilon={target_epsilon} "
                              "at this noise multiplier; raise noise_multiplier or epsilon")
        lo, hi = 1, 2
        while self.epsilon([(z, sample_rate, hi)], delta) <= target_epsilon:
            lo, hi = hi, hi * 2
            if hi > 10_000_000:
                return 10_000_000
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.epsilon([(z, sample_rate, mid)], delta) <= target_epsilon:
                lo = mid
            else:
                hi = mid
        return lo


def shares_for(min_clients: int, colluding: int) -> int:
    """n: the fewest honest shares in any sum SecAgg+ releases (it needs >= max(2, min_clients) clients)."""
    n = max(2, int(min_clients)) - int(colluding)
    if colluding < 0 or n < 1:
        raise ConfigError(f"config key '{KEY}.colluding': must be in [0, max(2, server.min_clients) - 1] "
                          f"(got {colluding} with server.min_clients = {min_clients})")
    return n


def accountant_from_config(cfg: Any, dim: int, num_clients: int) -> DDGaussAccountant:
    """The accountant of a run whose client.pipeline has 'ddgauss' (its params, the 'clip' stage's clip_norm)."""
    from secfed import registry

    def target(name: str) -> str:
        return registry.REGISTRY.get("client_stage", {}).get(name.lower(), name)

    stages = {target(p.name): p.params for p in cfg.client.pipeline}
    mine = stages.get("defenses.privacy.ddgauss:DDGaussNoise", {})
    clip = stages.get("defenses.privacy.clipping:ClipUpdate", {}).get("clip_norm")
    if clip is None:
        raise ConfigError(f"config key '{KEY}': needs the fixed 'clip' stage before it (adaptive clipping is not supported)")
    return DDGaussAccountant(clip_norm=float(clip), dim=dim,
                             shares=shares_for(cfg.server.min_clients, int(mine.get("colluding", 0))),
                             max_clients=int(num_clients), bits=int(mine.get("bits", 32)),
                             beta=float(mine.get("beta", DEFAULT_BETA)), rotate=bool(mine.get("rotate", True)),
                             max_wrap_probability=float(mine.get("max_wrap_probability", 1e-9)))


# ------------------------------------------------------------------ the client stage


class DDGaussNoise:
    """Client stage ``ddgauss``: rotate, scale, round, add N_Z(0, sigma^2), reduce mod 2^bits (module docstring).

    The ring elements go to SecAgg+ as they are (``update.ring``); the mechanism is the
    privacy guard's (``server.privacy = "dp-fedavg"`` publishes it every round), or, without
    a guard (tests), built from this stage's own ``noise_multiplier``.
    """

    dp_role = DPRole.SHARE | DPRole.RING_SHARE  # shares in Z_m for SecAgg+

    def __init__(self, bits: int = 32, beta: float = DEFAULT_BETA, rotate: bool = True, colluding: int = 0,
                 max_wrap_probability: float = 1e-9, noise_multiplier: float | None = None,
                 min_clients: int = 1, num_clients: int = 1, dim: int | None = None) -> None:
        self.shares = shares_for(min_clients, colluding)
        self.min_clients, self.num_clients = int(min_clients), int(num_clients)
        self.max_clients = max(self.num_clients, self.shares)  # N of the wrap-around bound: it sets the grid
        self.params = dict(bits=bits, beta=float(beta), rotate=bool(rotate), max_wrap_probability=float(max_wrap_probability))
        self.noise_multiplier = noise_multiplier
        if bits != int(bits) or not 8 <= int(bits) <= 62:
            raise ConfigError(f"config key '{KEY}.bits': an integer in [8, 62] (got {bits!r})")
        self._own: DDGaussMechanism | None = None

    @staticmethod
    def guard_mechanism(cfg: Any, dim: int, noise_multiplier: float) -> DDGaussMechanism:
        """The mechanism a ``dp-fedavg`` guard charges for this config at z (what a SuperNode rebuilds from the
        round's z: the guard itself runs on the server)."""
        return accountant_from_config(cfg, dim, cfg.data.num_clients).mechanism(float(noise_multiplier))

    def mechanism(self, info: Any, clip_norm: float, dim: int) -> DDGaussMechanism:
        """The guard's mechanism (``info``: the round's secfed.rounds.DPRound), checked against this stage's own."""
        mech = info.ddgauss
        if mech is not None:
            if self.noise_multiplier is not None and not math.isclose(self.noise_multiplier, mech.noise_multiplier, rel_tol=1e-9):
                raise ConfigError(f"config key '{KEY}.noise_multiplier': {self.noise_multiplier} differs from the privacy "
                                  f"guard's {mech.noise_multiplier}; leave it out and let server.privacy set it")
            # every parameter of the encoding (max_clients sets the grid): over Flower the node rebuilt the
            # mechanism from its config and the guard's z, and must encode on the server's grid
            mine = dict(clip_norm=clip_norm, dim=dim, shares=self.shares, max_clients=self.max_clients, **self.params)
            theirs = {k: getattr(mech, k) for k in mine}
            if mine != theirs:
                raise ConfigError(f"config key '{KEY}': the stage runs {mine}, server.privacy accounts for {theirs}")
            return mech
        if self.noise_multiplier is None:
            raise ConfigError(f"config key '{KEY}.noise_multiplier': no noise multiplier; give one, or set "
                              "server.privacy = {name = \"dp-fedavg\", epsilon = ..., delta = ...}")
        if self._own is None or self._own.clip_norm != clip_norm or self._own.dim != dim:
            self._own = DDGaussMechanism(clip_norm=clip_norm, dim=dim, noise_multiplier=float(self.noise_multiplier),
                                         shares=self.shares, max_clients=self.max_clients, **self.params)
        return self._own

    def __call__(self, update: Any, ctx: Any) -> Any:
        from defenses.privacy.clipping import round_info

        info = round_info(ctx)
        cfg = getattr(ctx.task, "cfg", None)
        if cfg is not None:
            from secfed import registry

            cls = registry.resolve("secure_sum", cfg.server.secure_sum.name, "server.secure_sum")
            if not getattr(cls, "sums_ring_inputs", False):  # SecAgg+ declares it (any alias or subclass)
                raise ConfigError(f"config key '{KEY}': the distributed discrete Gaussian needs server.secure_sum = "
                                  f"'secagg+' (got '{cfg.server.secure_sum.name}'); it sums ring elements")
        if info.adaptive:
            raise ConfigError(f"config key '{KEY}': needs the fixed 'clip' stage (adaptive clipping is not supported)")
        if update.weight != 1:
            raise ConfigError(f"config key 'client.weighting': ddgauss needs \"uniform\" (weight 1, got {update.weight})")
        c = info.clip_norm
        if c is None:
            raise ConfigError(f"config key '{KEY}': no clip norm; put 'clip' before 'ddgauss' in client.pipeline")
        if info.accounted is not None and info.ddgauss is None:  # a guard that would charge another mechanism
            raise ConfigError(f"config key '{KEY}': server.privacy does not account for ddgauss; use \"dp-fedavg\"")
        mech = self.mechanism(info, float(c), update.delta.numel())
        codec = info.ddgauss_codec
        if codec is None or codec.mechanism is not mech:
            seed = int(ctx.generator("ddgauss-rotation").initial_seed())  # public: the rotation is not noise
            codec = info.ddgauss_codec = RoundCodec(mech, seed)
        x = update.delta.detach().double().flatten().numpy()
        update.ring = RingInput(codec.encode(x), codec)
        info.distributed = True
        info.share_min_clients = self.min_clients
        info.share_divisor = self.shares
        ctx.metrics["dp_mechanism"] = "ddgauss"
        ctx.metrics["dp_grid_step"] = mech.gamma
        ctx.metrics["dp_share_std"] = mech.sigma * mech.gamma
        ctx.metrics["ddgauss_wrap_probability_bound"] = mech.wrap_probability()
        return update
