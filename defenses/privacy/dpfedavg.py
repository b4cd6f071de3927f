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

from defenses.privacy.analysis import adaptive_update_noise
from defenses.privacy.clipping import clip_to_norm, round_info
from defenses.privacy.noise import SOURCES, gaussian_like
from secfed.errors import ConfigError
from secfed.interfaces import ClientUpdate, RoundContext, SumResult


def _noise_multiplier(own: float | None, info: dict[str, Any], key: str) -> float:
    """z from the stage's own argument or from the privacy guard (which calibrates it); they must agree."""
    guard = info.get("noise_multiplier")
    if own is None and guard is None:
        raise ConfigError(f"config key '{key}.noise_multiplier': no noise multiplier; give one, or set "
                          "server.privacy = {name = \"dp-fedavg\", epsilon = ..., delta = ...}")
    if own is not None and guard is not None and not math.isclose(own, guard, rel_tol=1e-9):
        raise ConfigError(f"config key '{key}.noise_multiplier': {own} differs from the privacy guard's {guard}; "
                          "leave it out and let server.privacy set it")
    return float(own if own is not None else guard)


def _clip_norm(own: float | None, info: dict[str, Any], key: str) -> float:
    c = own if own is not None else info.get("clip_norm")
    if c is None:
        raise ConfigError(f"config key '{key}': no clip norm; put 'clip' or 'adaptive-clip' in client.pipeline")
    if own is not None and info.get("clip_norm") is not None and not math.isclose(own, info["clip_norm"], rel_tol=1e-9):
        raise ConfigError(f"config key '{key}.clip_norm': {own} differs from the clients' clip norm {info['clip_norm']}")
    return float(c)


def _check_source(noise: str, key: str) -> str:
    if noise not in SOURCES:
        raise ConfigError(f"config key '{key}.noise': one of {SOURCES} (got {noise!r})")
    return noise


class CentralGaussianNoise:
    """Server stage: aggregate + N(0, (z_eff C / qN)^2 I), z_eff = z, or z_Delta under adaptive clipping."""

    def __init__(self, noise_multiplier: float | None = None, clip_norm: float | None = None, noise: str = "csprng") -> None:
        self.noise_multiplier, self.clip_norm = noise_multiplier, clip_norm
        self.noise = _check_source(noise, "server.stages.central-gaussian")

    def __call__(self, aggregate: torch.Tensor, result: SumResult, ctx: RoundContext) -> torch.Tensor:
        key = "server.stages.central-gaussian"
        info = round_info(ctx)
        z = _noise_multiplier(self.noise_multiplier, info, key)
        c = _clip_norm(self.clip_norm, info, key)
        if info.get("distributed"):
            raise ConfigError(f"config key '{key}': clients already add distributed noise ('gaussian-share'); use one of the two")
        if info.get("adaptive"):
            if "count_noise_std" not in info:
                raise ConfigError("config key 'server.stages': list 'adaptive-clip' before 'central-gaussian'")
            z = adaptive_update_noise(z, info["count_noise_std"])
        std = z * c / ctx.expected_cohort
        gen = ctx.generator("dp-central-noise") if self.noise == "seeded" else None
        info["noise_added"] = True
        ctx.metrics["dp_noise_std"] = std
        ctx.metrics["dp_clip_norm"] = c
        return aggregate + gaussian_like(aggregate, std, self.noise, gen)


class DistributedGaussianNoise:
    """Client stage: delta + N(0, (zC)^2 / h I), h = min_clients - colluding (see module docstring)."""

    def __init__(self, noise_multiplier: float | None = None, clip_norm: float | None = None, colluding: int = 0,
                 allow_plain: bool = False, noise: str = "csprng", min_clients: int = 1) -> None:
        self.noise_multiplier, self.clip_norm, self.allow_plain = noise_multiplier, clip_norm, allow_plain
        self.noise = _check_source(noise, "client.pipeline.gaussian-share")
        self.share_divisor = int(min_clients) - int(colluding)
        if colluding < 0 or self.share_divisor < 1:
            raise ConfigError(f"config key 'client.pipeline.gaussian-share.colluding': must be in [0, server.min_clients - 1] "
                              f"(got {colluding} with server.min_clients = {min_clients})")

    def __call__(self, update: ClientUpdate, ctx: RoundContext) -> ClientUpdate:
        key = "client.pipeline.gaussian-share"
        info = round_info(ctx)
        cfg = getattr(ctx.task, "cfg", None)
        if cfg is not None and cfg.server.secure_sum.name == "plain" and not self.allow_plain:
            raise ConfigError(f"config key '{key}': distributed noise needs server.secure_sum = 'secagg+' or 'ckks'; "
                              "with the plain sum each update carries only part of the noise (allow_plain = true for tests)")
        if info.get("adaptive"):
            raise ConfigError(f"config key '{key}': adaptive clipping is supported with 'central-gaussian' only")
        z = _noise_multiplier(self.noise_multiplier, info, key)
        c = _clip_norm(self.clip_norm, info, key)
        std = z * c / math.sqrt(self.share_divisor)
        gen = ctx.generator(update.client_id, "dp-share") if self.noise == "seeded" else None
        info["distributed"] = True
        info["share_divisor"] = self.share_divisor
        ctx.metrics["dp_share_std"] = std
        update.delta = update.delta + gaussian_like(update.delta, std, self.noise, gen)
        return update


class AdaptiveClipClient:
    """Client stage: clip to the current C (broadcast in ``ctx.state["dp_clip_norm"]``) and report b_i."""

    def __init__(self, initial_clip_norm: float = 0.1) -> None:
        if not initial_clip_norm > 0:
            raise ConfigError(f"config key 'client.pipeline.adaptive-clip.initial_clip_norm': must be > 0 (got {initial_clip_norm})")
        self.initial_clip_norm = float(initial_clip_norm)

    def __call__(self, update: ClientUpdate, ctx: RoundContext) -> ClientUpdate:
        info = round_info(ctx)
        c = float(ctx.state.get("dp_clip_norm", self.initial_clip_norm))
        if info.get("clip_norm", c) != c:
            raise ConfigError("config key 'client.pipeline': 'adaptive-clip' together with another clipping stage")
        info["clip_norm"], info["adaptive"] = c, True
        update.delta, norm = clip_to_norm(update.delta, c)
        info.setdefault("unclipped", {})[update.client_id] = 1.0 if norm <= c else 0.0
        return update


class AdaptiveClipServer:
    """Server stage: noisy quantile estimate b~ and the geometric update of C (Andrew et al. 2021, Alg. 1).

    Args:
        initial_clip_norm: C_0 (must equal the client stage's).
        target_quantile: gamma, the fraction of updates meant to be unclipped.
        clip_lr: eta_C of C <- C exp(-eta_C (b~ - gamma)).
        count_noise_std: sigma_b; default qN / 20 (the paper's choice). Must exceed z / 2.
    """

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
        if not info.get("adaptive"):
            raise ConfigError("config key 'server.stages.adaptive-clip': needs 'adaptive-clip' in client.pipeline too")
        if info.get("noise_added"):
            raise ConfigError("config key 'server.stages': list 'adaptive-clip' before 'central-gaussian'")
        if not math.isclose(info["clip_norm"], self.clip_norm, rel_tol=1e-9):
            raise ConfigError(f"config key 'server.stages.adaptive-clip.initial_clip_norm': the clients clipped to "
                              f"{info['clip_norm']}, the server expects {self.clip_norm}; give both stages the same value")
        sigma_b = self.sigma_b(ctx)
        bits = info.get("unclipped", {})
        centered = sum(bits.get(cid, 0.0) - 0.5 for cid in result.client_ids)
        gen = ctx.generator("dp-count-noise") if self.noise == "seeded" else None
        noisy = centered + float(gaussian_like(torch.zeros(1, dtype=torch.float64), sigma_b, self.noise, gen))
        b = noisy / ctx.expected_cohort + 0.5
        info["count_noise_std"] = sigma_b
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
