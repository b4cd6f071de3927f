"""User-level DP: DP-FedAvg (McMahan et al. 2018) noise, central or distributed, and adaptive clipping.

Convention (REFERENCES.md): clients are Poisson-sampled with rate q, each clipped
update has L2 norm <= C, the server sums them, adds N(0, (zC)^2 I) and divides by the
*expected* cohort qN (``server.aggregator = {name = "mean", denominator =
"expected"}``). The engine's aggregate is already the mean sum / qN, so
:class:`CentralGaussianNoise` adds N(0, (zC / qN)^2 I) to it, which is the same thing.

With :class:`DistributedGaussianNoise` each client adds its own share
N(0, (zC)^2 / h I) before encoding, h = ``server.min_clients - colluding``: a round
only completes with >= ``min_clients`` clients (the engine aborts it otherwise), so the
sum of the shares of the honest survivors has variance >= (zC)^2 as long as at most
``colluding`` of them reveal their share to the server. It only protects anything
when the server sees the sum alone (``server.secure_sum = "secagg+"`` or ``"ckks"``);
with the plain sum each update carries only 1/sqrt(h) of the noise and is refused
unless ``allow_plain = true`` (tests).

Release without floating-point leaks (review finding 6; Canonne, Kamath & Steinke 2020):
with ``noise = "csprng"`` (the default) the noise is the discrete Gaussian on an integer
grid of step gamma (a power of two), drawn from OS randomness
(:mod:`defenses.privacy.discrete_gaussian`):

* central: the server snaps the (float) sum S = aggregate * qN to k = rint(S / gamma) and
  releases (k + Y) * gamma / qN with Y ~ N_Z(0, (z Delta_k)^2). Delta_k bounds the L2
  sensitivity of k: ||rint(a) - rint(b)|| <= ||a - b|| + sqrt(d), and ||a - b|| <= (C +
  slack) / gamma, where the slack bounds the float32 summation and scaling error (2 n^2
  2^-24 C + 4 n 2^-24 C for n summands) and a secure sum's quantisation step (SecAgg+:
  sqrt(d) * clip_range / (2^(q-1) - 1) for the one client that differs). gamma =
  2^floor(log2(C / (1024 sqrt(d)))), so the sqrt(d) term costs about 0.1% more noise.
  The released floats are a function of the integers alone (post-processing).
* distributed (``gaussian-share``): each client snaps its clipped delta to k_i =
  rint(delta_i / gamma) (||k_i|| <= C / gamma + sqrt(d) / 2) and adds its share
  Y_i ~ N_Z(0, (z Delta_k)^2 / h); gamma = 2^floor(log2(C / (64 sqrt(d)))) so that every
  value k * gamma stays exact in float32. The sum of h discrete Gaussians of variance
  sigma^2 each is within the tau = 10 sum_k exp(-2 pi^2 sigma^2 k / (k+1)) term of a
  discrete Gaussian of variance h sigma^2 (Kairouz, Liu & Steinke, ICML 2021, Thm. 12);
  sigma >= 4 grid steps is enforced, which makes tau < 1e-60.

The guard charges the continuous subsampled Gaussian of multiplier z: the discrete
Gaussian's Renyi divergence of every order is at most the continuous one's (CKS20 Prop. 5);
using the continuous subsampled-Gaussian accountant for the discrete mechanism follows
Kairouz et al. 2021 (Sec. 5). ``noise = "seeded"`` keeps the float Gaussian for non-private
simulations and is refused whenever a privacy guard is configured (finding 9).

Adaptive clipping (Andrew et al. 2021, "Differentially private learning with adaptive
clipping"): clients clip to the current C and report b_i = 1[||delta_i|| <= C]; the
server releases b~ = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / qN + 1/2 and sets
C <- C exp(-eta (b~ - gamma)). The update is then noised with
z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2) so that the pair costs exactly one Gaussian
mechanism with multiplier z (their Theorem 1), which is what the guard charges.
Limitation of this simulation: the bits b_i reach the server stage in the clear
(through ``ctx.state``), not through the secure sum; only the released b~ is private.
"""

from __future__ import annotations

import math
from typing import Any

import torch

import numpy as np

from defenses.privacy import discrete_gaussian
from defenses.privacy.analysis import adaptive_update_noise
from defenses.privacy.clipping import DPRound, clip_to_norm, round_info
from defenses.privacy.noise import SOURCES, gaussian_like
from secfed import registry
from secfed.errors import ConfigError
from secfed.interfaces import ClientUpdate, RoundContext, SumResult
from secfed.needs import DPRole, Need, reveals_of


def _noise_multiplier(own: float | None, info: DPRound, key: str) -> float:
    """z from the stage's own argument or from the privacy guard (which calibrates it); they must agree."""
    guard = info.noise_multiplier
    if own is None and guard is None:
        raise ConfigError(f"config key '{key}.noise_multiplier': no noise multiplier; give one, or set "
                          "server.privacy = {name = \"dp-fedavg\", epsilon = ..., delta = ...}")
    if own is not None and guard is not None and not math.isclose(own, guard, rel_tol=1e-9):
        raise ConfigError(f"config key '{key}.noise_multiplier': {own} differs from the privacy guard's {guard}; "
                          "leave it out and let server.privacy set it")
    return float(own if own is not None else guard)


def _clip_norm(own: float | None, info: DPRound, key: str) -> float:
    c = own if own is not None else info.clip_norm
    if c is None:
        raise ConfigError(f"config key '{key}': no clip norm; put 'clip' or 'adaptive-clip' in client.pipeline")
    if own is not None and info.clip_norm is not None and not math.isclose(own, info.clip_norm, rel_tol=1e-9):
        raise ConfigError(f"config key '{key}.clip_norm': {own} differs from the clients' clip norm {info.clip_norm}")
    return float(c)


def _sum_reveals_rows(cfg: Any) -> bool:
    """True when server.secure_sum declares that the server sees every row (the plain sum, or any alias/subclass)."""
    return Need.ROWS in reveals_of(registry.resolve("secure_sum", cfg.server.secure_sum.name, "server.secure_sum"))


def _check_source(noise: str, key: str) -> str:
    if noise not in SOURCES:
        raise ConfigError(f"config key '{key}.noise': one of {SOURCES} (got {noise!r})")
    return noise


def _refuse_seeded_under_guard(noise: str, info: DPRound, key: str) -> None:
    """Finding 9: seeded noise is rebuilt by anyone with the config; never under a privacy guard."""
    if noise == "seeded" and info.accounted is not None:
        raise ConfigError(f"config key '{key}.noise': \"seeded\" noise can be rebuilt from the config and carries no "
                          "epsilon; it is refused with server.privacy (leave it out: \"csprng\")")


def _accounted(info: DPRound, name: str, real: float, key: str) -> None:
    """Finding 1: the value a mechanism really uses must be the one the guard charges."""
    acc = info.accounted
    charged = None if acc is None else getattr(acc, name)
    if charged is not None and not math.isclose(float(real), float(charged), rel_tol=1e-9, abs_tol=1e-12):
        raise ConfigError(f"config key '{key}': the mechanism uses {name} = {real}, server.privacy accounts for "
                          f"{charged}; {name} is set by the engine only")


def power_of_two_grid(clip_norm: float, d: int, rho: float) -> float:
    """The grid step gamma = 2^floor(log2(rho C / sqrt(d))): the rounding term sqrt(d) costs a factor 1 + rho."""
    return 2.0 ** math.floor(math.log2(rho * clip_norm / math.sqrt(max(d, 1))))


def float_slack(n: int, clip_norm: float) -> float:
    """An L2 bound on how far float32 summation of n updates of norm <= C, and one scaling, move the sum:
    (n - 1) u sum_i ||x_i|| + 4 u n C with u = 2^-24, doubled for the two neighbouring datasets."""
    u = 2.0**-24
    return 2.0 * ((n - 1) * u * n * clip_norm + 4 * u * n * clip_norm)


def encoding_slack(result: SumResult, ctx: RoundContext) -> float:
    """L2 bound of a secure sum's own rounding of the one differing client (SecAgg+'s stochastic rounding)."""
    q = result.metrics.get("secagg_bits") if isinstance(result.metrics, dict) else None
    cfg = getattr(ctx.task, "cfg", None)
    if q is None or cfg is None:
        return 0.0
    step = float(cfg.server.secure_sum.params.get("clip_range", 1.0)) / (2 ** (int(q) - 1) - 1)
    return math.sqrt(ctx.spec.numel) * step


def discrete_release(total: np.ndarray, sensitivity: float, z: float, gamma: float) -> tuple[np.ndarray, float]:
    """(k + Y, sigma_k): k = rint(total / gamma), Y ~ N_Z(0, sigma_k^2), sigma_k = z (sensitivity / gamma + sqrt(d)).

    ``total`` is float64 with L2 sensitivity <= ``sensitivity``; k then has sensitivity <=
    sensitivity / gamma + sqrt(d), so the release is the discrete Gaussian mechanism with
    multiplier z on an integer query (CKS20). Returns int64 integers on the grid.
    """
    d = total.size
    sigma_k = z * (sensitivity / gamma + math.sqrt(d))
    k = np.rint(total / gamma)
    if not np.all(np.abs(k) < 2.0**62):
        raise ValueError("the sum is too large for the grid")
    return k.astype(np.int64) + discrete_gaussian.sample(sigma_k, d), sigma_k


class CentralGaussianNoise:
    """Server stage: aggregate + N(0, (z_eff C / qN)^2 I), z_eff = z, or z_Delta under adaptive clipping."""

    dp_role = DPRole.CENTRAL_NOISE

    #: grid step factor rho of :func:`power_of_two_grid` (the rounding costs a factor <= 1 + rho of noise)
    RHO = 2.0**-10

    def __init__(self, noise_multiplier: float | None = None, clip_norm: float | None = None, noise: str = "csprng") -> None:
        self.noise_multiplier, self.clip_norm = noise_multiplier, clip_norm
        self.noise = _check_source(noise, "server.stages.central-gaussian")

    def __call__(self, aggregate: torch.Tensor, result: SumResult, ctx: RoundContext) -> torch.Tensor:
        key = "server.stages.central-gaussian"
        info = round_info(ctx)
        _refuse_seeded_under_guard(self.noise, info, key)
        z = _noise_multiplier(self.noise_multiplier, info, key)
        c = _clip_norm(self.clip_norm, info, key)
        _accounted(info, "expected_cohort", ctx.expected_cohort, key)
        _accounted(info, "sample_rate", ctx.sample_rate if ctx.sample_rate is not None else float("nan"), key)
        if info.distributed:
            raise ConfigError(f"config key '{key}': clients already add distributed noise ('gaussian-share'); use one of the two")
        if info.adaptive:
            if info.count_noise_std is None:
                raise ConfigError("config key 'server.stages': list 'adaptive-clip' before 'central-gaussian'")
            z = adaptive_update_noise(z, info.count_noise_std)
        qn = ctx.expected_cohort
        std = z * c / qn
        info.noise_added = True
        ctx.metrics["dp_noise_std"] = std
        ctx.metrics["dp_clip_norm"] = c
        if self.noise == "seeded":  # non-private simulations only (float Gaussian, reproducible)
            return aggregate + gaussian_like(aggregate, std, "seeded", ctx.generator("dp-central-noise"))
        d = aggregate.numel()
        gamma = power_of_two_grid(c, d, self.RHO)
        sensitivity = c + float_slack(len(result.client_ids) + 1, c) + encoding_slack(result, ctx)
        total = aggregate.detach().to(torch.float64).flatten().numpy() * qn
        k, sigma_k = discrete_release(total, sensitivity, z, gamma)
        ctx.metrics["dp_mechanism"] = "discrete-gaussian"
        ctx.metrics["dp_grid_step"] = gamma
        ctx.metrics["dp_noise_std_released"] = sigma_k * gamma / qn
        return torch.from_numpy(k.astype(np.float64) * (gamma / qn)).to(aggregate.dtype).view_as(aggregate)


class DistributedGaussianNoise:
    """Client stage: delta + N(0, (zC)^2 / h I), h = min_clients - colluding (see module docstring)."""

    dp_role = DPRole.SHARE

    #: grid step factor rho (kept coarse enough that k * gamma is exact in float32)
    RHO = 2.0**-6

    def __init__(self, noise_multiplier: float | None = None, clip_norm: float | None = None, colluding: int = 0,
                 allow_plain: bool = False, noise: str = "csprng", min_clients: int = 1) -> None:
        self.noise_multiplier, self.clip_norm, self.allow_plain = noise_multiplier, clip_norm, allow_plain
        self.noise = _check_source(noise, "client.pipeline.gaussian-share")
        self.min_clients = int(min_clients)
        self.share_divisor = int(min_clients) - int(colluding)
        if colluding < 0 or self.share_divisor < 1:
            raise ConfigError(f"config key 'client.pipeline.gaussian-share.colluding': must be in [0, server.min_clients - 1] "
                              f"(got {colluding} with server.min_clients = {min_clients})")

    def __call__(self, update: ClientUpdate, ctx: RoundContext) -> ClientUpdate:
        key = "client.pipeline.gaussian-share"
        info = round_info(ctx)
        cfg = getattr(ctx.task, "cfg", None)
        if cfg is not None and _sum_reveals_rows(cfg) and not self.allow_plain:
            raise ConfigError(f"config key '{key}': distributed noise needs server.secure_sum = 'secagg+' or 'he'; "
                              "with the plain sum each update carries only part of the noise (allow_plain = true for tests)")
        if info.adaptive:
            raise ConfigError(f"config key '{key}': adaptive clipping is supported with 'central-gaussian' only")
        _refuse_seeded_under_guard(self.noise, info, key)
        _accounted(info, "min_clients", self.min_clients, key)
        z = _noise_multiplier(self.noise_multiplier, info, key)
        c = _clip_norm(self.clip_norm, info, key)
        std = z * c / math.sqrt(self.share_divisor)
        info.distributed = True
        info.share_divisor = self.share_divisor
        info.share_min_clients = self.min_clients  # the guard checks it against server.min_clients
        ctx.metrics["dp_share_std"] = std
        if self.noise == "seeded":  # non-private simulations only
            gen = ctx.generator(update.client_id, "dp-share")
            update.delta = update.delta + gaussian_like(update.delta, std, "seeded", gen)
            return update
        d = update.delta.numel()
        gamma = power_of_two_grid(c, d, self.RHO)
        sens_k = c / gamma + math.sqrt(d) / 2  # ||rint(delta / gamma)|| for ||delta|| <= C
        sigma_k = z * sens_k / math.sqrt(self.share_divisor)
        if sigma_k < 4:  # keeps the Kairouz et al. tau term of the sum of shares negligible
            raise ConfigError(f"config key '{key}': the share is {sigma_k:.3g} grid steps; need >= 4 (raise noise_multiplier)")
        k = np.rint(update.delta.detach().to(torch.float64).flatten().numpy() / gamma).astype(np.int64)
        k += discrete_gaussian.sample(sigma_k, d)
        info.share_grid_step = gamma
        ctx.metrics["dp_mechanism"] = "discrete-gaussian"
        ctx.metrics["dp_grid_step"] = gamma
        update.delta = torch.from_numpy(k.astype(np.float64) * gamma).to(update.delta.dtype).view_as(update.delta)
        return update


class AdaptiveClipClient:
    """Client stage: clip to the current C (broadcast in ``ctx.state["dp_clip_norm"]``) and report b_i."""

    dp_role = DPRole.CLIP | DPRole.ADAPTIVE

    def __init__(self, initial_clip_norm: float = 0.1) -> None:
        if not initial_clip_norm > 0:
            raise ConfigError(f"config key 'client.pipeline.adaptive-clip.initial_clip_norm': must be > 0 (got {initial_clip_norm})")
        self.initial_clip_norm = float(initial_clip_norm)

    def __call__(self, update: ClientUpdate, ctx: RoundContext) -> ClientUpdate:
        info = round_info(ctx)
        c = float(ctx.state.get("dp_clip_norm", self.initial_clip_norm))
        if info.clip_norm is not None and info.clip_norm != c:
            raise ConfigError("config key 'client.pipeline': 'adaptive-clip' together with another clipping stage")
        info.clip_norm, info.adaptive = c, True
        update.delta, norm = clip_to_norm(update.delta, c)
        info.unclipped[update.client_id] = 1.0 if norm <= c else 0.0
        return update


class AdaptiveClipServer:
    """Server stage: noisy quantile estimate b~ and the geometric update of C (Andrew et al. 2021, Alg. 1).

    Args:
        initial_clip_norm: C_0 (must equal the client stage's).
        target_quantile: gamma, the fraction of updates meant to be unclipped.
        clip_lr: eta_C of C <- C exp(-eta_C (b~ - gamma)).
        count_noise_std: sigma_b; default qN / 20 (the paper's choice). Must exceed z / 2.
    """

    dp_role = DPRole.ADAPTIVE

    def __init__(self, initial_clip_norm: float = 0.1, target_quantile: float = 0.5, clip_lr: float = 0.2,
                 count_noise_std: float | None = None, noise: str = "csprng") -> None:
        key = "server.stages.adaptive-clip"
        if not initial_clip_norm > 0:
            raise ConfigError(f"config key '{key}.initial_clip_norm': must be > 0")
        if not 0 < target_quantile < 1:
            raise ConfigError(f"config key '{key}.target_quantile': must be in (0, 1) (got {target_quantile})")
        if not clip_lr > 0:
            raise ConfigError(f"config key '{key}.clip_lr': must be > 0")
        if count_noise_std is not None and not count_noise_std > 0:
            raise ConfigError(f"config key '{key}.count_noise_std': must be > 0")
        self.clip_norm, self.target_quantile, self.clip_lr = float(initial_clip_norm), target_quantile, clip_lr
        self.count_noise_std = count_noise_std
        self.noise = _check_source(noise, key)

    def sigma_b(self, ctx: RoundContext) -> float:
        return float(self.count_noise_std if self.count_noise_std is not None else ctx.expected_cohort / 20.0)

    def __call__(self, aggregate: torch.Tensor, result: SumResult, ctx: RoundContext) -> torch.Tensor:
        info = round_info(ctx)
        if not info.adaptive:
            raise ConfigError("config key 'server.stages.adaptive-clip': needs 'adaptive-clip' in client.pipeline too")
        if info.noise_added:
            raise ConfigError("config key 'server.stages': list 'adaptive-clip' before 'central-gaussian'")
        if not math.isclose(info.clip_norm, self.clip_norm, rel_tol=1e-9):
            raise ConfigError(f"config key 'server.stages.adaptive-clip.initial_clip_norm': the clients clipped to "
                              f"{info.clip_norm}, the server expects {self.clip_norm}; give both stages the same value")
        _refuse_seeded_under_guard(self.noise, info, "server.stages.adaptive-clip")
        sigma_b = self.sigma_b(ctx)
        bits = info.unclipped
        centered = sum(bits.get(cid, 0.0) - 0.5 for cid in result.client_ids)
        if self.noise == "seeded":
            gen = ctx.generator("dp-count-noise")
            noisy = centered + float(gaussian_like(torch.zeros(1, dtype=torch.float64), sigma_b, "seeded", gen))
        else:  # the integer count sum_i (2 b_i - 1) (sensitivity 1) + N_Z(0, (2 sigma_b)^2), exactly (CKS20)
            twice = int(round(2 * centered))
            noisy = (twice + discrete_gaussian.sample_exact(4 * sigma_b * sigma_b)) / 2.0
        b = noisy / ctx.expected_cohort + 0.5
        info.count_noise_std = sigma_b
        ctx.metrics["dp_clip_norm"] = self.clip_norm
        ctx.metrics["dp_unclipped_estimate"] = b
        self.clip_norm = self.clip_norm * math.exp(-self.clip_lr * (b - self.target_quantile))
        ctx.state["dp_clip_norm"] = self.clip_norm  # broadcast to next round's clients (checkpointed)
        return aggregate

    def state_dict(self) -> dict[str, Any]:
        return {"clip_norm": self.clip_norm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "clip_norm" in state:
            self.clip_norm = float(state["clip_norm"])
