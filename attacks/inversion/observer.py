"""``dlg``: a curious server running gradient inversion on the updates it received.

Threat model: honest-but-curious server. It knows the architecture, the global
weights, the clients' training hyper-parameters (lr, local steps, batch size,
optimizer: they are in the shared config) and sees what the secure sum revealed:
individual decoded updates under ``plain``, nothing per client under SecAgg/CKKS
(the observer then reports ``dlg_status = "no per-client update"``).

From a client's update ``delta`` after one plain SGD step the gradient is
``-delta / lr`` and DLG/iDLG apply directly; after ``K > 1`` steps the observer
runs Inverting Gradients' FedAvg variant, unrolling the K known steps. Adam's
first step is ``-lr m/(sqrt(v)+eps) ~ -lr sign(g)``, which keeps no gradient
magnitudes; the observer reports that and does not attack. ``target = "aggregate"``
attacks the round's mean update instead (what the server has under any secure sum
if it knows there was one client; against n clients it shows averaging's effect).

Ground truth is used **for metrics only**: to score a reconstruction the observer
reads the examples the attacked client's trainer reported using (the engine's
evaluation record, :mod:`secfed.truth`; it never rebuilds a batch schedule, which
DP-SGD's secret Poisson batches would make wrong); the attack itself never sees them.
In group mode a row is a group's mean (:class:`~secfed.interfaces.GroupId`) and is
scored against every member's examples, never one client's. Without a record (over
Flower, or a trainer that reports no batches) it reports ``dlg_status = "no ground
truth ..."``. PNGs (originals on top, reconstructions below) go to
``<run_dir>/attacks/``. Config::

    [[server.observers]]
    name = "dlg"
    method = "idlg"        # idlg | dlg | ig
    attack_rounds = [1]    # [] = every round
    clients = []           # [] = the first `max_clients` updates of the round
    iterations = 300
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks.inversion.common import NO_TRUTH, attacked_rows, missing_truth, model_before
from attacks.inversion.dlg import dlg, idlg_label, inverting_gradients
from attacks.inversion.metrics import mse, psnr, ssim
from secfed.errors import ConfigError
from secfed.interfaces import GroupId, RoundContext, ServerView
from secfed.needs import Need
from secfed.truth import GroundTruth

METHODS = ("idlg", "dlg", "ig")


def save_side_by_side(path: Path, originals: torch.Tensor, recons: torch.Tensor, title: str = "") -> None:
    """Originals (top row) and reconstructions (bottom row) as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = originals.shape[0]
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n + 0.4, 3.4), squeeze=False)
    for row, imgs, name in ((0, originals, "original"), (1, recons, "reconstruction")):
        for i in range(n):
            im = imgs[i].detach().clamp(0, 1)
            ax = axes[row][i]
            if im.shape[0] == 1:
                ax.imshow(im[0].numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(im.permute(1, 2, 0).numpy())
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


class GradientInversionObserver:
    # reads each client's update (target "client") or the sum ("aggregate"); scores against what the
    # clients trained on (Need.GROUND_TRUTH: the engine's evaluation record, secfed.truth)
    needs = Need.ROWS | Need.SUM | Need.GROUND_TRUTH

    def __init__(self, method: str = "idlg", attack_rounds: list[int] | None = None, clients: list[int] | None = None,
                 max_clients: int = 1, iterations: int = 300, target: str = "client", tv: float = 1e-2,
                 ig_lr: float = 0.1, save_images: bool = True, lr: float = 5e-3, optimizer: str = "adam",
                 momentum: float = 0.0, batch_size: int = 16, seed: int = 0) -> None:
        if method not in METHODS:
            raise ConfigError(f"config key 'server.observers.method': '{method}' is not one of {METHODS}")
        if target not in ("client", "aggregate"):
            raise ConfigError("config key 'server.observers.target': must be 'client' or 'aggregate'")
        self.method, self.rounds, self.clients = method, list(attack_rounds or []), list(clients or [])
        self.max_clients, self.iterations, self.target = max_clients, iterations, target
        self.tv, self.ig_lr, self.save_images = tv, ig_lr, save_images
        self.lr, self.optimizer, self.momentum = lr, optimizer, momentum
        self.batch_size, self.seed = batch_size, seed

    # ------------------------------------------------------------------ helpers
    def _attack(self, model: torch.nn.Module, delta: torch.Tensor, view: ServerView, steps: int, bsz: int,
                shape: tuple[int, ...], num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        pieces = [p.view(s) for p, s in zip(torch.split(delta, view.spec.sizes), view.spec.shapes)]
        last_w = pieces[-2]  # the last linear layer's weight (bias is last)
        if steps == 1 and self.method in ("idlg", "dlg"):
            grads = [-p / self.lr for p in pieces]
            label = torch.tensor([idlg_label(grads[-2])]) if self.method == "idlg" and bsz == 1 else None
            r = dlg(model, grads, (bsz, *shape), num_classes, label=label, iterations=self.iterations, seed=seed)
            return r.x, r.label
        label = torch.tensor([idlg_label(-last_w)]) if bsz == 1 else None
        if label is None:
            raise ValueError("Inverting Gradients here needs batch size 1 (labels from iDLG)")
        if steps == 1:
            r = inverting_gradients(model, [-p for p in pieces], (bsz, *shape), label, iterations=self.iterations,
                                    lr=self.ig_lr, tv=self.tv, seed=seed)
        else:
            r = inverting_gradients(model, pieces, (bsz, *shape), label, iterations=self.iterations, lr=self.ig_lr,
                                    tv=self.tv, seed=seed, local_steps=steps, local_lr=self.lr, batch_size=bsz)
        return r.x, r.label

    # ------------------------------------------------------------------ the observer
    def __call__(self, view: ServerView, ctx: RoundContext, truth: GroundTruth | None = None) -> dict[str, Any] | None:
        if self.rounds and view.round not in self.rounds:
            return None
        task = view.task
        if task is not None and not getattr(task, "image_inputs", False):
            return {"dlg_psnr": None, "dlg_status": "not an image task (use text-inversion)"}
        if self.target == "client" and view.updates is None:
            return {"dlg_psnr": None, "dlg_status": "no per-client update"}
        if self.optimizer != "sgd" or self.momentum > 0:
            return {"dlg_psnr": None, "dlg_status": f"client optimizer {self.optimizer} (momentum {self.momentum}): "
                    "the update is not a scaled gradient; set client.optimizer = 'sgd'"}
        if missing_truth(truth):
            return {"dlg_psnr": None, "dlg_status": NO_TRUTH}
        model = model_before(view)
        shape = tuple(task.train.tensors["pixels"].shape[1:])
        if self.target == "aggregate":
            jobs = [(-1, view.aggregate, [truth.clients[c] for c in ctx.cohort if c in truth.clients])]
        else:
            ids, chosen = attacked_rows(view, truth, self.clients, self.max_clients)
            jobs = [(u, view.updates[ids.index(u)], truth.of(u)) for u in chosen]
        out: dict[str, list[float]] = {"psnr": [], "ssim": [], "mse": [], "label_acc": []}
        for cid, delta, owners in jobs:
            if not owners or not any(len(o.used()) for o in owners):
                continue
            truth_x = [o.batch()["pixels"] for o in owners]  # what each owner's trainer reported using
            truth_y = [o.batch()["labels"] for o in owners]
            steps = len(owners[0].steps)
            if isinstance(cid, int) and cid >= 0:  # one client: its batch is what the update holds
                bsz = int(truth_x[0].shape[0])
            else:  # the aggregate or a group mean: one reconstruction, best match over the owners' examples
                bsz = min(self.batch_size, int(truth_x[0].shape[0]))
            if steps > 1 and self.method != "ig":
                steps_note = f"{steps} local steps: use method 'ig' (unrolled FedAvg variant)"
                return {"dlg_psnr": None, "dlg_status": steps_note}
            tag = cid.index if isinstance(cid, GroupId) else max(cid, 0)
            x_hat, y_hat = self._attack(model, delta, view, steps, bsz, shape, task.num_classes,
                                        seed=self.seed + view.round * 1000 + tag)
            # metrics only: best match over the owners' true examples
            cand = torch.cat(truth_x)
            labels = torch.cat(truth_y)
            scores = [psnr(x_hat[0], c) for c in cand]
            best = int(np.argmax(scores))
            out["psnr"].append(scores[best])
            out["ssim"].append(ssim(x_hat[0], cand[best]))
            out["mse"].append(mse(x_hat[0], cand[best]))
            out["label_acc"].append(float(int(y_hat[0]) == int(labels[best])))
            if self.save_images and ctx.run_dir is not None:
                name = str(cid) if isinstance(cid, GroupId) else "aggregate" if cid < 0 else f"client{cid}"
                save_side_by_side(Path(ctx.run_dir) / "attacks" / f"{self.method}_round{view.round}_{name}.png",
                                  cand[best : best + 1], x_hat[:1], f"{self.method} round {view.round} {name}: "
                                  f"PSNR {scores[best]:.1f} dB")
        agg = {f"dlg_{k}": (float(np.mean(v)) if v else None) for k, v in out.items()}
        agg["dlg_status"] = "ok" if self.target == "client" else f"aggregate of {len(ctx.cohort)} clients"
        agg["dlg_clients"] = len(jobs)
        return agg
