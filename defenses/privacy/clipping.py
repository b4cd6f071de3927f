"""Client-side update clipping: delta <- delta * min(1, C / ||delta||_2) (McMahan et al. 2018).

The L2 norm is over the whole flat adapter/head update (``flat`` clipping in the
paper's terms; TensorFlow Federated's ``DifferentiallyPrivateFactory`` also clips the
whole structure). The clip norm C the cohort used this round is published in
the round's :class:`secfed.rounds.DPRound` so the noise stages calibrate to the clip actually applied.
"""

from __future__ import annotations

from typing import Any

import torch

from secfed.errors import ConfigError
from secfed.interfaces import ClientUpdate, RoundContext
from secfed.needs import DPRole


def clip_to_norm(delta: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, float]:
    """(clipped delta, original norm). Computed in float64 so the result's norm is <= C up to float32 rounding."""
    norm = float(torch.linalg.vector_norm(delta.double()))
    if norm <= clip_norm:
        return delta, norm
    return (delta.double() * (clip_norm / norm)).to(delta.dtype), norm


# This round's DP bookkeeping shared by the DP stages: defined with the round driver (secfed.rounds), which
# also carries it to SuperNodes as a typed object (DPRoundParams).
from secfed.rounds import DPRound, round_info  # noqa: E402,F401


class ClipUpdate:
    """Clip every client's update to L2 norm ``clip_norm`` (fixed clipping)."""

    dp_role = DPRole.CLIP  # secfed.needs: the privacy guard recognises clipping by this

    def __init__(self, clip_norm: float) -> None:
        if not (clip_norm > 0):
            raise ConfigError(f"config key 'client.pipeline.clip.clip_norm': must be > 0 (got {clip_norm})")
        self.clip_norm = float(clip_norm)

    def __call__(self, update: ClientUpdate, ctx: RoundContext) -> ClientUpdate:
        info = round_info(ctx)
        if info.clip_norm is not None and info.clip_norm != self.clip_norm:
            raise ConfigError("config key 'client.pipeline': two clipping stages with different clip norms")
        info.clip_norm = self.clip_norm
        update.delta, norm = clip_to_norm(update.delta, self.clip_norm)
        update.metrics["update_norm"] = norm
        return update
