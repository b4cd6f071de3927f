"""Gradient inversion on images: DLG, iDLG and Inverting Gradients (incl. the FedAvg variant).

* DLG (Zhu, Liu & Han, NeurIPS 2019, "Deep Leakage from Gradients"): optimise a
  dummy image x' and dummy soft label y' to minimise ``sum_l ||grad_l(x', y') - grad_l||^2``
  with L-BFGS (lr 1). As in the paper's reference code, one "iteration" is one
  ``LBFGS.step`` (torch's default of up to 20 inner iterations); the dummy image
  starts from N(0, 1) and the label from N(0, 1) logits.
* iDLG (Zhao, Mopuri & Bilen 2020): with cross-entropy and one example the last
  layer's weight gradient is ``(softmax(z) - e_y) h^T``; with non-negative
  activations ``h`` the true label's row is the only one with a negative sum,
  so ``y = argmin_i sum_j dW_ij``. Then DLG runs with the label fixed.
* Inverting Gradients (Geiping et al., NeurIPS 2020): minimise
  ``1 - cos(grad', grad) + alpha TV(x')`` with Adam on the *signed* gradient,
  x' kept in the box [0, 1], learning rate decayed by 10 at 3/8, 5/8, 7/8 of the
  iterations. The FedAvg variant (their Sec. 5) unrolls the client's known local
  SGD steps on the dummy batch and matches the resulting weight difference.

Threat model: an honest-but-curious server that knows the architecture and the
global weights and sees one client's update. All functions are plain: they take a
model (whose trainable parameters are the ones the update covers) and the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy with soft targets (probabilities), as in DLG's reference code."""
    return torch.mean(torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1))


def model_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, create_graph: bool = False) -> list[torch.Tensor]:
    """Gradients of the mean cross-entropy w.r.t. the trainable parameters (hard or soft labels)."""
    logits = model(x)
    loss = F.cross_entropy(logits, y) if y.dtype == torch.long else soft_cross_entropy(logits, y)
    return list(torch.autograd.grad(loss, list(trainable(model).values()), create_graph=create_graph))


def idlg_label(last_weight_grad: torch.Tensor) -> int:
    """iDLG: the row of the last linear layer's weight gradient with the smallest (negative) sum."""
    return int(torch.argmin(last_weight_grad.sum(dim=-1)))


def dlg_init(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-initialise weights and biases uniformly in [-0.5, 0.5], as DLG's reference code does."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand(p.shape, generator=g) - 0.5)
    return model


@dataclass
class Reconstruction:
    x: torch.Tensor  # (N, C, H, W) in [0, 1]
    label: torch.Tensor  # (N,) hard labels
    loss: float  # final matching loss
    iterations: int
    history: list[float]


def dlg(model: nn.Module, target_grads: list[torch.Tensor], shape: tuple[int, ...], num_classes: int, *,
        label: torch.Tensor | None = None, iterations: int = 300, seed: int = 0, tol: float = 1e-12,
        stall: int = 10, callback: Callable[[int, float], None] | None = None) -> Reconstruction:
    """DLG with L-BFGS; with ``label`` given (e.g. from :func:`idlg_label`) this is iDLG.

    ``target_grads`` is the per-parameter gradient list in the order of the model's
    trainable parameters; ``shape`` is the batch's (N, C, H, W).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).requires_grad_(True)
    params = [x]
    if label is None:
        y_logits = torch.randn(shape[0], num_classes, generator=g).requires_grad_(True)
        params.append(y_logits)
    opt = torch.optim.LBFGS(params, lr=1.0)
    targets = [t.detach() for t in target_grads]
    history: list[float] = []

    def closure() -> torch.Tensor:
        opt.zero_grad()
        y = label if label is not None else F.softmax(y_logits, dim=-1)
        grads = model_gradients(model, x, y, create_graph=True)
        loss = sum(((a - b) ** 2).sum() for a, b in zip(grads, targets))
        loss.backward()
        return loss

    it = 0
    for it in range(1, iterations + 1):
        loss = float(opt.step(closure).detach())
        history.append(loss)
        if callback is not None:
            callback(it, loss)
        if not math.isfinite(loss) or loss < tol:
            break
        if len(history) > stall and history[-1 - stall] - loss <= 1e-9 * abs(loss):
            break  # L-BFGS made no progress for `stall` steps (converged or stuck)
    y_hat = label if label is not None else y_logits.detach().argmax(-1)
    return Reconstruction(x.detach().clamp(0, 1), y_hat.detach(), history[-1] if history else math.nan, it, history)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV: mean |x_{i+1,j} - x_ij| + mean |x_{i,j+1} - x_ij| (Geiping et al.'s code)."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def cosine_loss(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    dot = sum((u * v).sum() for u, v in zip(a, b))
    na = torch.sqrt(sum((u * u).sum() for u in a))
    nb = torch.sqrt(sum((v * v).sum() for v in b))
    return 1 - dot / (na * nb + 1e-12)


def unrolled_update(model: nn.Module, x: torch.Tensor, y: torch.Tensor, local_steps: int, lr: float,
                    batch_size: int | None = None) -> list[torch.Tensor]:
    """``w_K - w_0`` after ``local_steps`` SGD steps on (x, y), differentiable in x (FedAvg variant).

    Batches cycle through the data in order, ``batch_size`` at a time (all at once if None).
    """
    params = trainable(model)
    w = {n: p for n, p in params.items()}
    n = x.shape[0]
    bs = batch_size or n
    for k in range(local_steps):
        s = (k * bs) % n
        xb, yb = x[s : s + bs], y[s : s + bs]
        logits = functional_call(model, w, (xb,))
        loss = F.cross_entropy(logits, yb) if yb.dtype == torch.long else soft_cross_entropy(logits, yb)
        grads = torch.autograd.grad(loss, list(w.values()), create_graph=True)
        w = {name: p - lr * gr for (name, p), gr in zip(w.items(), grads)}
    return [w[name] - params[name] for name in params]


def inverting_gradients(model: nn.Module, target: list[torch.Tensor], shape: tuple[int, ...], label: torch.Tensor, *,
                        iterations: int = 2000, lr: float = 0.1, tv: float = 1e-2, seed: int = 0,
                        local_steps: int = 0, local_lr: float = 0.0, batch_size: int | None = None,
                        callback: Callable[[int, float], None] | None = None) -> Reconstruction:
    """Inverting Gradients. ``local_steps = 0``: ``target`` is a gradient; ``local_steps = K > 0``:
    ``target`` is the client's update ``w_K - w_0`` after K SGD steps of size ``local_lr`` (FedAvg)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)],
                                                 gamma=0.1)
    targets = [t.detach() for t in target]
    history: list[float] = []
    for it in range(1, iterations + 1):
        opt.zero_grad()
        if local_steps > 0:
            cand = unrolled_update(model, x, label, local_steps, local_lr, batch_size)
        else:
            cand = model_gradients(model, x, label, create_graph=True)
        loss = cosine_loss(cand, targets) + tv * total_variation(x)
        (gx,) = torch.autograd.grad(loss, [x])
        x.grad = gx.sign()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(0, 1)
        history.append(float(loss.detach()))
        if callback is not None:
            callback(it, history[-1])
    return Reconstruction(x.detach(), label.detach(), history[-1], iterations, history)


def gaussian_defense(grads: list[torch.Tensor], std: float, generator: torch.Generator) -> list[torch.Tensor]:
    """Add N(0, std^2) to every coordinate (the DLG paper's noise defence)."""
    return [g + std * torch.randn(g.shape, generator=generator) for g in grads]


def dp_defense(grads: list[torch.Tensor], clip: float, noise_multiplier: float, generator: torch.Generator) -> list[torch.Tensor]:
    """DP-FedAvg on one client's update: clip the whole update to norm C, add N(0, (z C)^2)."""
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    scale = min(1.0, clip / (float(norm) + 1e-12))
    return [g * scale + noise_multiplier * clip * torch.randn(g.shape, generator=generator) for g in grads]
