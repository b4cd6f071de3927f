"""``imprint``: a malicious server that ships trap weights and reads images out of any secure sum.

Threat model: the server deviates. It chooses the architecture (``model.name = "fc-imprint"``,
:class:`secfed.models.ImprintMLP`: a linear layer + ReLU in front of a linear head) and, in the
rounds it attacks, the weights it ships. It sees only what the secure sum releases: under
SecAgg+ the (weighted) sum of the cohort's updates, never a client's own update.

The imprint module (Fowl, Geiping, Czaja, Goldblum & Goldstein, "Robbing the Fed: directly
obtaining private data in federated learning with modified models", ICLR 2022; the same trap
principle as Boenisch et al., "When the curious abandon honesty", EuroS&P 2023): every row of
the first layer measures the same statistic h(x) = <v, x> (v a random direction; the paper's
mean brightness v = 1/D is ``measure = "brightness"``: on digits, whose pixels take 17 values,
it ties more often),
and row i has bias -c_i, with c_1 < ... < c_k quantiles of h over data the server holds (its
test split), so neuron i fires iff h(x) > c_i. Every column of the head is the same vector u,
so dL/dz_i = u . (softmax - onehot) = gamma(x) for every active neuron. One SGD step of a
batch gives, per row, ``dW_i = sum_{x: h(x) > c_i} gamma(x) x / B`` and
``db_i = sum_{x: h(x) > c_i} gamma(x) / B``. Gradients add up across clients, so in the sum of
the cohort's updates (weights a_j included)

    (dW_i - dW_{i+1}) / (db_i - db_{i+1}) = x        for the one image with c_i < h(x) <= c_{i+1},

exactly, whatever the client weights and batch sizes: a bin holding one image of the whole
cohort gives that image back; a bin holding several gives their gamma-weighted average.
With N images and k bins placed at quantiles, about N (1 - 1/k)^(N-1) of them sit alone.

What stops it (measured in ``tests/test_attacks_imprint.py`` and ``benchmarks/attacks.py``):
client-side DP-SGD (every difference is buried in sigma C noise), clients that refuse a model
they cannot recompute (``client.verify_model``: w_t must be w_{t-1} plus the published update;
the crafted layer is not), or a frozen first layer (its gradient is never sent). Secure
aggregation alone does not: the attack needs nothing but the sum. The attack needs one local
plain-SGD step per client (Adam's first step keeps only gradient signs; more steps move the
bins; both are reported, not hidden).

Ground truth is used for metrics only: each reconstruction is scored against the closest image
of the cohort's shards (PSNR, MAX = 1). Config::

    [attack.server]
    name = "imprint"
    attack_rounds = [1]    # [] = every round
    measure = "random"     # the statistic the bins measure: random direction | brightness
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks.inversion.common import NO_TRUTH, missing_truth, model_before
from attacks.inversion.metrics import psnr
from secfed.errors import ConfigError
from secfed.interfaces import RoundContext, ServerView
from secfed.needs import Need
from secfed.spec import ParamSpec

EXACT_DB = 30.0  # a reconstruction at or above this PSNR counts as recovered exactly


def _layers(spec: ParamSpec) -> dict[str, tuple[int, tuple[int, ...]]]:
    """name -> (offset in the flat vector, shape)."""
    out, off = {}, 0
    for n, s, k in zip(spec.names, spec.shapes, spec.sizes):
        out[n] = (off, tuple(s))
        off += k
    return out


def imprint_slices(spec: ParamSpec) -> dict[str, tuple[int, tuple[int, ...]]] | None:
    """Where the imprint layer and the head sit in the flat weights; None if the model has no such layers."""
    lay = _layers(spec)
    need = ("imprint.weight", "imprint.bias", "head.weight", "head.bias")
    if not all(n in lay for n in need):
        return None
    return {n: lay[n] for n in need}


def _piece(w: torch.Tensor, at: tuple[int, tuple[int, ...]]) -> torch.Tensor:
    off, shape = at
    return w[off : off + int(np.prod(shape))].view(shape)


def craft_imprint(global_w: torch.Tensor, spec: ParamSpec, public_pixels: torch.Tensor, seed: int = 0,
                  measure: str = "random") -> torch.Tensor:
    """The trap weights (module docstring): rows = v, biases = -quantiles of <v, x> over
    ``public_pixels``, every head column = one vector u (distinct entries, scaled by 1/k so that the
    softmax does not saturate and gamma(x) = u . (p - e_y) stays away from 0)."""
    sl = imprint_slices(spec)
    if sl is None:
        raise ConfigError("attack.server 'imprint': the model has no imprint layer; use model.name = 'fc-imprint' "
                          "(the architecture the malicious server chooses)")
    w = global_w.clone()
    W, b = _piece(w, sl["imprint.weight"]), _piece(w, sl["imprint.bias"])
    H, hb = _piece(w, sl["head.weight"]), _piece(w, sl["head.bias"])
    k, D = W.shape
    g = torch.Generator().manual_seed(seed)
    v = torch.full((D,), 1.0 / D) if measure == "brightness" else torch.randn(D, generator=g) / D
    h = public_pixels.reshape(len(public_pixels), -1).double() @ v.double()
    levels = torch.arange(1, k + 1, dtype=torch.float64) / (k + 1)
    c = torch.quantile(h, levels)
    W.copy_(v[None].expand(k, D))
    b.copy_(-c.float())
    u = torch.randn(H.shape[0], generator=g) / k  # small: the logits stay far from saturation, so gamma(x) != 0
    H.copy_(u[:, None].expand_as(H))
    hb.zero_()
    return w


def recover_images(aggregate: torch.Tensor, spec: ParamSpec, shape: tuple[int, ...],
                   rel_tol: float = 1e-6) -> torch.Tensor:
    """Reconstructions from a summed (or averaged) update of the imprint layer: one image per bin
    whose bias-gradient difference is non-zero (bins ordered by their threshold)."""
    sl = imprint_slices(spec)
    assert sl is not None
    dW = _piece(aggregate, sl["imprint.weight"]).double()
    db = _piece(aggregate, sl["imprint.bias"]).double()
    # difference of consecutive bins; the last bin stands alone
    dWd = dW - torch.cat([dW[1:], torch.zeros_like(dW[:1])])
    dbd = db - torch.cat([db[1:], torch.zeros_like(db[:1])])
    scale = float(dbd.abs().max()) if dbd.numel() else 0.0
    keep = dbd.abs() > rel_tol * scale if scale > 0 else torch.zeros_like(dbd, dtype=torch.bool)
    x = dWd[keep] / dbd[keep][:, None]
    return x.float().reshape(-1, *shape)


def score(recons: torch.Tensor, truth: torch.Tensor) -> dict[str, Any]:
    """Each reconstruction's PSNR against its closest true image (metrics only)."""
    if len(recons) == 0 or len(truth) == 0:
        return {"psnr": [], "match": []}
    r = recons.reshape(len(recons), -1).clamp(0, 1)
    t = truth.reshape(len(truth), -1)
    d = torch.cdist(r.double(), t.double()) ** 2 / r.shape[1]
    best = d.argmin(1)
    return {"psnr": [psnr(recons[i].clamp(0, 1), truth[int(best[i])]) for i in range(len(recons))],
            "match": best.tolist()}


class ImprintAttack:
    """A malicious server running the imprint attack (module docstring); registry kind ``server_adversary``."""

    needs = Need.SUM  # reads the round's aggregate (all a secure sum releases)

    def __init__(self, attack_rounds: list[int] | None = None, save_images: bool = True, measure: str = "random",
                 seed: int = 0, local_steps: int = 0, local_epochs: int = 1, optimizer: str = "adam",
                 momentum: float = 0.0) -> None:
        if measure not in ("random", "brightness"):
            raise ConfigError("config key 'attack.server.measure': 'random' or 'brightness'")
        self.measure = measure
        if attack_rounds is not None and not all(isinstance(r, int) and r >= 1 for r in attack_rounds):
            raise ConfigError("config key 'attack.server.attack_rounds': a list of round numbers >= 1")
        self.rounds = list(attack_rounds if attack_rounds is not None else [1])
        self.save_images, self.seed = save_images, seed
        self.local_steps, self.local_epochs, self.optimizer, self.momentum = local_steps, local_epochs, optimizer, momentum

    def attacks(self, t: int) -> bool:
        return not self.rounds or t in self.rounds

    def check(self, spec: ParamSpec, task: Any) -> None:
        """Refuse, when the run is built, a task or model the attack cannot craft (one ConfigError line)."""
        if not getattr(task, "image_inputs", False):
            raise ConfigError("config key 'attack.server': 'imprint' needs an image task (data.source digits / "
                              "synthetic-images)")
        if imprint_slices(spec) is None:
            raise ConfigError("config key 'attack.server': 'imprint' needs model.name = 'fc-imprint' (a linear first "
                              "layer + ReLU: the architecture the malicious server chooses)")

    def craft(self, global_w: torch.Tensor, spec: ParamSpec, task: Any, ctx: RoundContext) -> torch.Tensor:
        """The weights shipped in round ``ctx.round``: the trap weights in an attacked round, else ``global_w`` itself."""
        if not self.attacks(ctx.round):
            return global_w
        self.check(spec, task)
        return craft_imprint(global_w, spec, task.test.tensors["pixels"], seed=self.seed, measure=self.measure)

    def recover(self, view: ServerView, ctx: RoundContext) -> dict[str, Any] | None:
        """Reconstructions from the round's aggregate (all a secure sum releases), scored against the cohort's data."""
        if not self.attacks(view.round):
            return None
        task = view.task
        note = None
        if self.optimizer != "sgd" or self.momentum > 0:
            note = f"client optimizer {self.optimizer}: the update is not a scaled gradient (use client.optimizer = 'sgd')"
        elif self.local_steps > 1 or (self.local_steps == 0 and self.local_epochs > 1):
            note = "several local steps: the bins move between steps (exact only for one step)"
        agg = view.aggregate
        if not bool(torch.isfinite(agg).all()) or float(agg.abs().max()) == 0.0:
            return {"imprint_psnr": None, "imprint_exact": 0, "imprint_status": "nothing to read: no sum this round "
                    "(the clients refused the model or dropped)"}
        shape = tuple(task.train.tensors["pixels"].shape[1:])
        recons = recover_images(agg, view.spec, shape)
        truth = torch.cat([task.client_data(c).tensors["pixels"] for c in ctx.cohort]) if ctx.cohort else \
            torch.zeros(0, *shape)
        s = score(recons, truth)
        exact = {m for p, m in zip(s["psnr"], s["match"]) if p >= EXACT_DB}
        finite = [p if np.isfinite(p) else 300.0 for p in s["psnr"]]
        out = {"imprint_psnr": float(np.median(finite)) if finite else None, "imprint_exact": len(exact),
               "imprint_reconstructions": len(recons), "imprint_status": note or "ok"}
        if self.save_images and ctx.run_dir is not None and len(recons):
            from attacks.inversion.observer import save_side_by_side

            order = np.argsort(finite)[::-1][:8].tolist()
            save_side_by_side(Path(ctx.run_dir) / "attacks" / f"imprint_round{view.round}.png",
                              truth[[s["match"][i] for i in order]], recons[order].clamp(0, 1),
                              f"imprint round {view.round}: best {len(order)} of {len(recons)} reconstructions")
        return out


class LoraTrapAttack:
    """``lora-trap``: the imprint idea adapted to a LoRA federation, where the base model is pinned and
    the server ships only the adapter (and head).

    In standard LoRA, B starts at 0, so the first step's gradient of A, ``B^T sum_t delta_t x_t^T``, is
    0 and only B moves. A malicious server ships a random full-rank B (scale ``b_scale``): then the
    gradient of every layer-0 A has the row space span{x_t} of *every input token of the cohort*, and
    DAGER's span check (:mod:`attacks.inversion.text`, Petrov et al. 2024) tests each vocabulary token
    against it -- on the SecAgg+ sum, as if the cohort were one batch. It recovers the cohort's tokens
    (at most ``cohort x batch`` per position, not who wrote them) while their count stays below the
    rank r and the hidden size; the server sets r in the config. Needs ``model.lora_layers`` to include
    layer 0 and plain SGD (one step). Ground truth (the cohort's batches, as their trainers reported them:
    :mod:`secfed.truth`) is read for metrics only.
    Config: ``[attack.server] name = "lora-trap"``.
    """

    needs = Need.SUM | Need.GROUND_TRUTH  # reads the sum; scores against what the cohort trained on (secfed.truth)

    def __init__(self, attack_rounds: list[int] | None = None, b_scale: float = 0.02, tau: float = 0.05,
                 seed: int = 0, optimizer: str = "adam") -> None:
        self.rounds = list(attack_rounds if attack_rounds is not None else [1])
        self.b_scale, self.tau, self.seed = b_scale, tau, seed
        self.optimizer = optimizer

    def attacks(self, t: int) -> bool:
        return not self.rounds or t in self.rounds

    @staticmethod
    def _targets(spec: ParamSpec) -> list[str]:
        from attacks.inversion.text import LORA_RE

        return [n for n in spec.names if (m := LORA_RE.search(n)) is not None and m.group(2) == "B"]

    def check(self, spec: ParamSpec, task: Any) -> None:
        """Refuse, when the run is built, a model without a layer-0 LoRA B of a text encoder (one ConfigError line)."""
        if not getattr(task, "text_encoder_inputs", False) or not self._targets(spec):
            raise ConfigError("config key 'attack.server': 'lora-trap' needs a text classifier with a trainable LoRA B "
                              "in layer 0 (model.lora_r > 0, model.lora_layers including 0)")

    def craft(self, global_w: torch.Tensor, spec: ParamSpec, task: Any, ctx: RoundContext) -> torch.Tensor:
        if not self.attacks(ctx.round):
            return global_w
        self.check(spec, task)
        lay = _layers(spec)
        targets = self._targets(spec)
        w = global_w.clone()
        g = torch.Generator().manual_seed(self.seed)
        for n in targets:
            piece = _piece(w, lay[n])
            piece.copy_(self.b_scale * torch.randn(piece.shape, generator=g))
        return w

    def recover(self, view: ServerView, ctx: RoundContext, truth: Any = None) -> dict[str, Any] | None:
        if not self.attacks(view.round):
            return None
        from attacks.inversion.text import invert_text_update, score as text_score

        agg = view.aggregate
        if not bool(torch.isfinite(agg).all()) or float(agg.abs().max()) == 0.0:
            return {"lora_trap_token_recall": None, "lora_trap_status": "nothing to read: no sum this round"}
        task = view.task
        if missing_truth(truth):
            return {"lora_trap_token_recall": None, "lora_trap_status": NO_TRUTH}
        model = model_before(view, eval_mode=False)
        true_ids: list[list[int]] = []
        for c in ctx.cohort:  # metrics only: the cohort's batches, as each client's trainer reported them
            if c in truth.clients and len(truth.clients[c].used()):
                b = truth.clients[c].batch()
                true_ids += [row[m.bool()].tolist() for row, m in zip(b["input_ids"], b["attention_mask"])]
        res = invert_text_update(model, view.spec.names, view.spec.shapes, agg, task.cfg.data.max_length,
                                 batch_size=max(len(true_ids), 1), tau=self.tau)
        m = text_score(res, true_ids, set(task.tokenizer.all_special_ids))
        note = "ok" if self.optimizer == "sgd" else f"client optimizer {self.optimizer}: the span check needs sgd"
        return {"lora_trap_token_recall": m["token_recall"], "lora_trap_token_precision": m["token_precision"],
                "lora_trap_sequences": len(true_ids), "lora_trap_status": f"{res['method']}; {note}"}
