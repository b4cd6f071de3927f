"""Image reconstruction metrics: MSE, PSNR and SSIM on images in [0, 1].

PSNR = 10 log10(MAX^2 / MSE) with MAX = 1. SSIM is Wang et al. (2004): an 11x11
Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, computed per channel over the
"valid" window positions and averaged (scikit-image's ``gaussian_weights=True``
convention; images smaller than the window use a window of the image's size).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def mse(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(((x.float() - y.float()) ** 2).mean())


def psnr(x: torch.Tensor, y: torch.Tensor, max_val: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical images)."""
    e = mse(x, y)
    return math.inf if e == 0 else 10.0 * math.log10(max_val**2 / e)


def _gauss_window(size: int, sigma: float) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(x: torch.Tensor, y: torch.Tensor, max_val: float = 1.0, win: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity of two (C, H, W) or (N, C, H, W) images."""
    x = x.double().reshape(-1, 1, *x.shape[-2:])
    y = y.double().reshape(-1, 1, *y.shape[-2:])
    win = min(win, x.shape[-1], x.shape[-2])
    w = _gauss_window(win, sigma)[None, None]
    c1, c2 = (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
    mx, my = F.conv2d(x, w), F.conv2d(y, w)
    sxx = F.conv2d(x * x, w) - mx**2
    syy = F.conv2d(y * y, w) - my**2
    sxy = F.conv2d(x * y, w) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return float(s.mean())
