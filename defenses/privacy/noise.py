"""Gaussian noise for DP mechanisms: from the OS CSPRNG by default, seeded only for experiments.

``source = "csprng"`` (default): uniforms from ``os.urandom`` (53 random bits each),
Box-Muller in float64, and -- as Opacus' ``secure_mode`` does, following Holohan &
Braghin 2021 (arXiv 2107.10138, Sec. 5.1, n = 2) -- the sum of four independent normals
divided by 2, which has the same variance and blunts the floating-point attacks on
naive Gaussian sampling (Mironov 2012; arXiv 2112.05307). The result is rounded to
float32 (the update's dtype); that rounding is *not* covered by a formal analysis.

``source = "seeded"``: ``torch.normal`` from a generator derived from the run seed
(reproducible experiments and tests only; an observer who knows the seed can remove
the noise, so it protects nothing).
"""

from __future__ import annotations

import os

import numpy as np
import torch

SOURCES = ("csprng", "seeded")


def _urandom_uniform(n: int) -> np.ndarray:
    """n uniforms in (0, 1] from 53-bit integers drawn from the OS CSPRNG."""
    raw = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
    return (raw.astype(np.float64) + 1.0) / float(1 << 53)


def csprng_normal(n: int) -> np.ndarray:
    """n standard normals (float64): mean of 4 Box-Muller normals times 2."""
    m = (n + 1) // 2
    total = np.zeros(2 * m)
    for _ in range(4):
        u1, u2 = _urandom_uniform(m), _urandom_uniform(m)
        r = np.sqrt(-2.0 * np.log(u1))
        total[:m] += r * np.cos(2 * np.pi * u2)
        total[m:] += r * np.sin(2 * np.pi * u2)
    return total[:n] / 2.0


def gaussian_like(ref: torch.Tensor, std: float, source: str = "csprng", generator: torch.Generator | None = None) -> torch.Tensor:
    """N(0, std^2) noise with the shape and dtype of ``ref``."""
    if std < 0:
        raise ValueError("noise std must be >= 0")
    if std == 0 or ref.numel() == 0:
        return torch.zeros_like(ref)
    if source == "csprng":
        z = torch.from_numpy(csprng_normal(ref.numel()) * std)
        return z.to(ref.dtype).view_as(ref)
    if source == "seeded":
        if generator is None:
            raise ValueError("seeded noise needs a generator")
        return (torch.randn(ref.shape, generator=generator, dtype=torch.float64) * std).to(ref.dtype)
    raise ValueError(f"noise source must be one of {SOURCES}, got {source!r}")
