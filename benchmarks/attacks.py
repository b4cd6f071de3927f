"""Privacy attacks and audits: reproduce issue 7's figures and time each attack.

    python benchmarks/attacks.py            # full (tens of minutes on 2 shared CPU cores)
    python benchmarks/attacks.py --quick    # smoke version (a few minutes)

Writes benchmarks/results/attacks.json (``--quick``: attacks_quick.json) with a
``headline`` computed here from the measured rows:
dlg_converged_fraction (iDLG seeds with PSNR > 30 dB out of seeds tried, digits and
photo crops), dlg_median_psnr_db_converged, idlg_label_accuracy,
text_token_recall_bs1 (bag of words from a trained MiniLM embedding, batch 1, one
local step), audit_eps_lower_bound_planted_bug (m = 1000, noiseless mechanism);
issue 17, a malicious server through SecAgg+ (parts imprint, lora_trap):
imprint_psnr_db_secagg / imprint_exact_fraction_secagg (batch 4, cohort 8, digits,
fc-imprint), imprint_psnr_db_dpsgd / imprint_exact_fraction_dpsgd (client DP-SGD z = 1,
C = 1: the defence that stops it), imprint_exact_fraction_model_check (client.verify_model),
lora_trap_token_recall_secagg_r128_cohort2 (MiniLM LoRA, trap B, span check on the sum).
No peer toolkit runs side by side: breaching and ML Privacy Meter need torchvision
/CUDA builds this machine cannot install; the one-run bound is checked against the
paper's closed form in tests/test_attacks_audit.py instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _machine import machine  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from attacks.dp_audit.canary import CanaryAudit, audit_dpfedavg, best_over_guesses, gaussian_sum  # noqa: E402
from attacks.dp_audit.one_run import claimed_epsilon  # noqa: E402
from attacks.inversion.dlg import (dlg, dlg_init, dp_defense, gaussian_defense, idlg_label,  # noqa: E402
                                   inverting_gradients, model_gradients)
from attacks.inversion.metrics import psnr, ssim  # noqa: E402
from attacks.inversion.text import invert_text_update, score  # noqa: E402
from secfed.config import parse_config  # noqa: E402
from secfed.data import load_digits  # noqa: E402
from secfed.models import LeNetSigmoid  # noqa: E402
from secfed.spec import ParamSpec  # noqa: E402
from secfed.task import Task  # noqa: E402
from secfed.training import SGDTrainer  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- images

def photo_crops(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    """Grey 128x128 crops of scikit-learn's two sample photographs, area-resized to size x size."""
    from sklearn.datasets import load_sample_images

    imgs = load_sample_images().images
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        im = torch.tensor(imgs[k % len(imgs)], dtype=torch.float32).mean(-1) / 255.0
        i = int(torch.randint(0, im.shape[0] - 128, (1,), generator=g))
        j = int(torch.randint(0, im.shape[1] - 128, (1,), generator=g))
        out.append(F.interpolate(im[i : i + 128, j : j + 128][None, None], size=(size, size), mode="area")[0])
    return torch.stack(out)


def image_targets(n_digits: int, n_photos: int, skip_digits: int = 0, skip_photos: int = 0) -> list[tuple[str, torch.Tensor, int]]:
    d = load_digits(32)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(d), generator=g)[skip_digits : skip_digits + n_digits]
    out = [(f"digit{int(i)}", d.tensors["pixels"][i : i + 1], int(d.labels[i])) for i in idx]
    photos = photo_crops(skip_photos + n_photos)
    out += [(f"photo{k}", photos[k : k + 1], k % 10) for k in range(skip_photos, skip_photos + n_photos)]
    return out


def bench_dlg(n_digits: int, n_photos: int, n_dlg: int, iters: int, skip_digits: int = 0, skip_photos: int = 0) -> dict:
    rows = []
    for s, (name, x, y) in enumerate(image_targets(n_digits, n_photos, skip_digits, skip_photos), start=skip_digits + skip_photos):
        model = dlg_init(LeNetSigmoid(10, 32, 1), seed=s)
        grads = model_gradients(model, x, torch.tensor([y]))
        lab = idlg_label(grads[-2])
        t0 = time.perf_counter()
        r = dlg(model, grads, x.shape, 10, label=torch.tensor([lab]), iterations=iters, seed=s)
        sec = time.perf_counter() - t0
        rows.append({"attack": "idlg", "image": name, "seed": s, "label_ok": lab == y, "psnr_db": psnr(r.x, x),
                     "ssim": ssim(r.x, x), "iterations": r.iterations, "seconds": sec,
                     "seconds_per_100_iter": 100 * sec / max(r.iterations, 1), "final_loss": r.loss})
        log(f"idlg {name}: label {'ok' if lab == y else 'WRONG'} PSNR {rows[-1]['psnr_db']:.1f} dB ({sec:.0f} s)")
        if s - skip_digits - skip_photos < n_dlg:
            t0 = time.perf_counter()
            r = dlg(model, grads, x.shape, 10, iterations=iters, seed=s)
            sec = time.perf_counter() - t0
            rows.append({"attack": "dlg", "image": name, "seed": s, "label_ok": int(r.label[0]) == y,
                         "psnr_db": psnr(r.x, x), "ssim": ssim(r.x, x), "iterations": r.iterations, "seconds": sec,
                         "seconds_per_100_iter": 100 * sec / max(r.iterations, 1), "final_loss": r.loss})
            log(f"dlg  {name}: label {'ok' if rows[-1]['label_ok'] else 'WRONG'} PSNR {rows[-1]['psnr_db']:.1f} dB")
    return {"rows": rows}


def bench_ig(iters: int) -> dict:
    """Inverting Gradients on the engine's default-init LeNet: one step, and FedAvg with 3 unrolled steps."""
    d = load_digits(32)
    rows = []
    for s in range(1):
        torch.manual_seed(s)
        model = LeNetSigmoid(10, 32, 1)
        x, y = d.tensors["pixels"][s : s + 1], d.labels[s : s + 1]
        g = model_gradients(model, x, y)
        t0 = time.perf_counter()
        r = inverting_gradients(model, g, x.shape, torch.tensor([idlg_label(g[-2])]), iterations=iters, seed=s)
        sec = time.perf_counter() - t0
        rows.append({"attack": "ig", "local_steps": 1, "seed": s, "psnr_db": psnr(r.x, x), "ssim": ssim(r.x, x),
                     "seconds_per_100_iter": 100 * sec / iters})
        # FedAvg: 3 local SGD steps (lr 0.1) on the same image; the server sees w_3 - w_0
        w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        upd = [p.detach() - w0[n] for n, p in model.named_parameters()]
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(w0[n])
        lab = torch.tensor([idlg_label(-upd[-2])])
        t0 = time.perf_counter()
        r = inverting_gradients(model, upd, x.shape, lab, iterations=iters, seed=s, local_steps=3, local_lr=0.1)
        sec = time.perf_counter() - t0
        rows.append({"attack": "ig-fedavg", "local_steps": 3, "seed": s, "psnr_db": psnr(r.x, x), "ssim": ssim(r.x, x),
                     "label_ok": int(lab) == int(y), "seconds_per_100_iter": 100 * sec / iters})
        log(f"ig seed {s}: 1 step {rows[-2]['psnr_db']:.1f} dB, 3 unrolled steps {rows[-1]['psnr_db']:.1f} dB")
    return {"rows": rows, "iterations": iters}


def bench_defenses(seeds: int, iters: int) -> dict:
    d = load_digits(32)
    rows = []
    for s in range(seeds):
        model = dlg_init(LeNetSigmoid(10, 32, 1), seed=s)
        x, y = d.tensors["pixels"][s : s + 1], d.labels[s : s + 1]
        g = model_gradients(model, x, y)
        gnorm = float(torch.sqrt(sum((a**2).sum() for a in g)))
        rms = gnorm / np.sqrt(sum(a.numel() for a in g))
        settings = [("none", {}, g)]
        for std in (1e-3, 1e-2, 1e-1):
            settings.append(("gaussian", {"std": std}, gaussian_defense(g, std, torch.Generator().manual_seed(s))))
        for z in (0.01, 0.1):
            settings.append(("dp-fedavg", {"clip": 1.0, "noise_multiplier": z},
                             dp_defense(g, 1.0, z, torch.Generator().manual_seed(s))))
        for kind, params, tg in settings:
            r = dlg(model, tg, x.shape, 10, label=torch.tensor([idlg_label(tg[-2])]), iterations=iters, seed=s)
            rows.append({"defense": kind, **params, "seed": s, "psnr_db": psnr(r.x, x), "grad_norm": gnorm,
                         "grad_rms_per_coord": rms})
            log(f"defense {kind} {params} seed {s}: PSNR {rows[-1]['psnr_db']:.1f} dB")
        # plain averaging over 8 clients: the server sees the mean of 8 single-image gradients
        xs, ys = d.tensors["pixels"][s * 8 : s * 8 + 8], d.labels[s * 8 : s * 8 + 8]
        gs = [model_gradients(model, xs[i : i + 1], ys[i : i + 1]) for i in range(8)]
        mean = [sum(parts) / 8 for parts in zip(*gs)]
        r = dlg(model, mean, x.shape, 10, label=torch.tensor([idlg_label(mean[-2])]), iterations=iters, seed=s)
        best = max(psnr(r.x, xs[i : i + 1]) for i in range(8))
        rows.append({"defense": "mean of 8 clients", "seed": s, "psnr_db": best})
        log(f"defense mean-of-8 seed {s}: best PSNR over the 8 images {best:.1f} dB")
    return {"rows": rows, "iterations": iters}


def bench_secagg() -> dict:
    """The dlg observer under each secure sum, through the engine (1 round, 3 clients)."""
    from secfed.engine import Engine, read_rounds
    import tempfile

    out = {}
    for ss in ("plain", "secagg", "ckks"):
        cfg = parse_config({"run": {"name": "secagg-dlg", "rounds": 1}, "data": {"source": "digits", "num_clients": 3,
                            "test_size": 300, "image_size": 8}, "model": {"name": "lenet"},
                            "client": {"optimizer": "sgd", "lr": 0.1, "batch_size": 1, "local_steps": 1},
                            "server": {"secure_sum": ss, "observers": [{"name": "dlg", "iterations": 5}]}})
        try:
            with tempfile.TemporaryDirectory() as td:
                Engine(cfg, Path(td) / "run", progress=False).run()
                rec = read_rounds(Path(td) / "run")[0]
            out[ss] = {"dlg_status": rec.get("dlg_status"), "dlg_psnr": rec.get("dlg_psnr")}
        except Exception as e:  # a secure sum not available here is reported, not hidden
            out[ss] = {"error": f"{type(e).__name__}: {e}"}
        log(f"secure sum {ss}: {out[ss]}")
    return out


# ----------------------------------------------------------------------------- malicious server (issue 17)

IMPRINT_HEADLINE = {"batch_size": 4, "cohort": 8}


def imprint_case(batch: int, cohort: int, secure_sum: str = "secagg", client: dict | None = None,
                 seed: int = 0) -> dict:
    """One round through the engine: a malicious server ships the imprint trap weights (fc-imprint,
    256 bins) to a cohort of ``cohort`` digits clients; it reads the secure sum only."""
    from secfed.engine import Engine, read_rounds
    import tempfile

    c = {"optimizer": "sgd", "lr": 0.1, "batch_size": batch, "local_steps": 1, **(client or {})}
    cfg = parse_config({"run": {"name": "imprint", "rounds": 1, "seed": seed}, "model": {"name": "fc-imprint"},
                        "data": {"source": "digits", "num_clients": cohort, "test_size": 300, "image_size": 8},
                        "client": c, "server": {"secure_sum": secure_sum},
                        "attack": {"server": {"name": "imprint", "save_images": False}}})
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as td:
        Engine(cfg, Path(td) / "run", progress=False).run()
        rec = read_rounds(Path(td) / "run")[0]
    steps = c["local_steps"]
    images = batch * cohort * steps
    return {"batch_size": batch, "cohort": cohort, "local_steps": steps, "optimizer": c["optimizer"],
            "secure_sum": secure_sum, "defence": client.get("defence", "none") if client else "none",
            "images_trained": images, "status": rec.get("status"), "completed": rec.get("completed"),
            "psnr_db": rec.get("imprint_psnr"), "exact": rec.get("imprint_exact"),
            "exact_fraction": (rec.get("imprint_exact") or 0) / images,
            "reconstructions": rec.get("imprint_reconstructions"), "attack_status": rec.get("imprint_status"),
            "seconds": time.perf_counter() - t0}


def bench_imprint(quick: bool) -> dict:
    """Images recovered exactly (PSNR >= 30 dB) through SecAgg+ vs batch size and cohort size, and what stops it."""
    rows = []
    batches, cohorts = ((2, 8), (2, 8)) if quick else ((1, 2, 4, 8, 16), (2, 4, 8, 16))
    for b in batches:
        for n in cohorts:
            rows.append(imprint_case(b, n))
            log(f"imprint bs={b} cohort={n}: median PSNR {rows[-1]['psnr_db']} dB, exact {rows[-1]['exact']}"
                f"/{rows[-1]['images_trained']}")
    b, n = IMPRINT_HEADLINE["batch_size"], IMPRINT_HEADLINE["cohort"]
    variants = [("dp-sgd (z=1, C=1)", {"trainer": {"name": "dp-sgd", "max_grad_norm": 1.0, "noise_multiplier": 1.0}}),
                ("model check (client.verify_model)", {"verify_model": True}),
                ("none: 4 local steps", {"local_steps": 4}),
                ("none: adam", {"optimizer": "adam", "lr": 1e-3})]
    if not any(r["batch_size"] == b and r["cohort"] == n for r in rows):
        rows.append(imprint_case(b, n))
    for name, client in variants:
        r = imprint_case(b, n, client=client)
        r["defence"] = name
        rows.append(r)
        log(f"imprint {name} bs={b} cohort={n}: {r['status']}, median PSNR {r['psnr_db']} dB, exact {r['exact']}")
    plain = imprint_case(b, n, secure_sum="plain")
    plain["defence"] = "none (plain sum, for comparison)"
    rows.append(plain)
    return {"rows": rows, "setup": "digits 8x8, model fc-imprint (Linear(64, 256) + ReLU + Linear(256, 10)), one round, "
            "plain SGD lr 0.1, exact = PSNR >= 30 dB against the closest cohort image, psnr_db = median over the "
            "server's reconstructions", "headline_setting": IMPRINT_HEADLINE}


def lora_trap_case(r: int, cohort: int, client: dict | None = None) -> dict:
    """One round of MiniLM + LoRA (layer 0, rank r) on tweets, batch 1 per client, through SecAgg+; the
    malicious server ships a random full-rank LoRA B (``lora-trap``) and runs the span check on the sum."""
    from secfed.engine import Engine, read_rounds
    import tempfile

    c = {"optimizer": "sgd", "lr": 0.05, "batch_size": 1, "local_steps": 1, **(client or {})}
    cfg = parse_config({"run": {"name": "lora-trap", "rounds": 1}, "model": {"name": "minilm", "lora_r": r, "lora_layers": [0]},
                        "data": {"source": "tweets", "num_clients": cohort, "max_examples": 400, "test_size": 100,
                                 "max_length": 32},
                        "client": c, "server": {"secure_sum": "secagg"}, "attack": {"server": {"name": "lora-trap"}}})
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as td:
        Engine(cfg, Path(td) / "run", progress=False).run()
        rec = read_rounds(Path(td) / "run")[0]
    return {"lora_r": r, "cohort": cohort, "batch_size": 1, "defence": "model check" if c.get("verify_model") else "none",
            "status": rec.get("status"), "token_recall": rec.get("lora_trap_token_recall"),
            "token_precision": rec.get("lora_trap_token_precision"), "attack_status": rec.get("lora_trap_status"),
            "seconds": time.perf_counter() - t0}


def bench_lora_trap(quick: bool) -> dict:
    """The imprint idea in a LoRA federation: token recovery from the SecAgg+ sum vs cohort size and rank."""
    grid = [(128, 2)] if quick else [(128, 2), (128, 4), (128, 8), (8, 2)]
    rows = []
    for r, n in grid:
        rows.append(lora_trap_case(r, n))
        log(f"lora-trap r={r} cohort={n}: recall {rows[-1]['token_recall']} precision {rows[-1]['token_precision']}")
    rows.append(lora_trap_case(128, 2, {"verify_model": True}))
    log(f"lora-trap model check: {rows[-1]['status']}")
    return {"rows": rows, "setup": "MiniLM, LoRA on layer 0 (query/value), tweets max_length 32, batch 1 per client, one "
            "plain-SGD step, SecAgg+; the server ships B ~ N(0, 0.02^2); DAGER span check on the sum"}


# ----------------------------------------------------------------------------- text

def text_task(lora_r: int, train_embeddings: bool, lora_layers: list[int] | None) -> Task:
    cfg = parse_config({"data": {"source": "tweets", "max_examples": 2000, "test_size": 200, "max_length": 48,
                                 "num_clients": 4},
                        "model": {"name": "minilm", "lora_r": lora_r, "lora_layers": lora_layers,
                                  "train_embeddings": train_embeddings}})
    return Task(cfg)


def text_case(task: Task, examples: int, batch_size: int, steps: int, z: float, optimizer: str, warm_b: bool,
              seed: int = 0) -> dict:
    """Run the client's local training (the engine's SGDTrainer) and the inversion on its update."""
    model = task.build_model()
    spec = ParamSpec.from_module(model)
    if warm_b:  # later rounds: LoRA B is no longer zero
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.02 * torch.randn(p.shape, generator=g))
    w0 = spec.flatten(model)
    special = set(task.tokenizer.all_special_ids)
    rows = []
    rng = np.random.default_rng(seed)
    for e in range(examples):
        idx = rng.permutation(len(task.train))[: batch_size * steps]
        data = task.train.subset(np.sort(idx))
        spec.assign(model, w0)
        SGDTrainer(local_steps=steps, batch_size=batch_size, lr=0.05, optimizer=optimizer).train(
            model, task, data, torch.Generator().manual_seed(e))
        delta = spec.flatten(model) - w0
        if z > 0:  # DP-FedAvg on this update: clip at its own norm (no-op), add N(0, (z C)^2)
            C = float(delta.norm())
            delta = delta + z * C * torch.randn(delta.shape, generator=torch.Generator().manual_seed(e))
        spec.assign(model, w0)
        t0 = time.perf_counter()
        res = invert_text_update(model, spec.names, spec.shapes, delta, task.cfg.data.max_length,
                                 batch_size=batch_size, noisy=z > 0)
        sec = time.perf_counter() - t0
        true = [row[m.bool()].tolist() for row, m in zip(data.tensors["input_ids"], data.tensors["attention_mask"])]
        m = score(res, true, special)
        rows.append({**m, "method": res["method"], "seconds": sec,
                     "tokens": sum(len(t) for t in true)})
    agg = {k: float(np.mean([r[k] for r in rows if r[k] is not None])) if any(r[k] is not None for r in rows) else None
           for k in ("token_recall", "token_precision", "rouge1", "rouge2", "exact", "seconds", "tokens")}
    agg["method"] = rows[0]["method"]
    agg["examples"] = examples
    return agg


def bench_text(quick: bool) -> dict:
    n = 2 if quick else 3
    out: dict = {"film": [], "dager": []}
    task = text_task(8, True, None)
    for bs, steps, z, opt in ([(1, 1, 0.0, "sgd"), (1, 1, 0.0, "adam")] if quick else
                              [(1, 1, 0.0, "sgd"), (1, 1, 0.0, "adam"), (4, 1, 0.0, "sgd"), (1, 4, 0.0, "adam"),
                               (1, 1, 1e-2, "sgd")]):
        r = text_case(task, n, bs, steps, z, opt, warm_b=False)
        out["film"].append({"lora_r": 8, "batch_size": bs, "local_steps": steps, "noise_multiplier": z,
                            "optimizer": opt, **r})
        log(f"film bs={bs} steps={steps} z={z} {opt}: recall {r['token_recall']:.2f} precision {r['token_precision']:.2f}")
    grid = [(8, 1, 1, 0.0, 1), (64, 1, 1, 0.0, 1)] if quick else \
        [(8, 1, 1, 0.0, 1), (64, 1, 1, 0.0, 1)]
    for r_, bs, steps, z, n_ex in grid:
        task = text_task(r_, False, [0])
        r = text_case(task, n_ex, bs, steps, z, "sgd", warm_b=True)
        out["dager"].append({"lora_r": r_, "batch_size": bs, "local_steps": steps, "noise_multiplier": z,
                             "optimizer": "sgd", **r})
        log(f"dager r={r_} bs={bs} steps={steps} z={z}: recall {r['token_recall']:.2f} exact {r['exact']}")
    return out


# ----------------------------------------------------------------------------- membership

def bench_membership(quick: bool) -> dict:
    from attacks.membership.experiment import membership_experiment

    K, pool, epochs = (3, 400, 20) if quick else (6, 800, 40)
    base = {"run": {"name": "mia", "rounds": 1, "seed": 0}, "data": {"source": "digits", "num_clients": 1, "test_size": 300},
            "model": {"name": "cnn"}, "server": {"cohort_size": 1}}
    over = parse_config({**base, "client": {"local_epochs": epochs, "batch_size": 32, "lr": 3e-3}})
    t0 = time.perf_counter()
    res = {"overfit": membership_experiment(over, K, pool)}
    res["overfit"]["seconds"] = time.perf_counter() - t0
    log(f"mia overfit: {res['overfit']}")
    dp = parse_config({**base, "client": {"local_epochs": 10, "batch_size": 64, "lr": 1e-2,
                                          "trainer": {"name": "dp-sgd", "max_grad_norm": 1.0}},  # csprng: seeded noise is refused with a guard
                       "server": {"cohort_size": 1, "privacy": {"name": "dp-sgd", "epsilon": 1.0, "delta": 1e-5}}})
    t0 = time.perf_counter()
    res["dp_eps1"] = membership_experiment(dp, K, pool)
    res["dp_eps1"]["seconds"] = time.perf_counter() - t0
    log(f"mia dp eps=1: {res['dp_eps1']}")
    res["setup"] = {"models": K, "pool": pool, "overfit_epochs": epochs, "data": "digits 8x8", "model": "cnn"}
    return res


# ----------------------------------------------------------------------------- audit

def bench_audit(quick: bool) -> dict:
    rows = []
    seeds = 1 if quick else 3
    bg = lambda t: 0.1 * torch.randn(20, 2048, generator=torch.Generator().manual_seed(1000 + t))
    t0 = time.perf_counter()
    bug = audit_dpfedavg(m=1000, d=2048, rounds=1, noise_multiplier=4.5, forget_noise=True, background=bg)
    bug["seconds"] = time.perf_counter() - t0
    rows.append({"mechanism": "planted bug (no noise)", **bug})
    log(f"audit planted bug: {bug}")
    for z, T in ((4.5, 1), (1.0, 1), (0.5, 1), (1.0, 4)):
        for s in range(seeds):
            a = CanaryAudit(1000, 2048, 1.0, seed=s)
            g = torch.Generator().manual_seed(s + 1)
            for t in range(T):
                a.observe(gaussian_sum(torch.cat([bg(t), a.canary_rows()]), 1.0, z, g))
            fixed = a.result(1e-5)
            best = best_over_guesses(a.scores.numpy(), a.included.numpy(), 1e-5)
            rows.append({"mechanism": "gaussian", "noise_multiplier": z, "rounds": T, "seed": s,
                         "claimed_eps": claimed_epsilon(z, 1.0, T, 1e-5), "eps_lower_bound": fixed.eps_lower_bound,
                         "eps_lower_bound_best_k": best.eps_lower_bound, "correct": fixed.correct, "guesses": fixed.guesses})
            log(f"audit z={z} T={T} seed {s}: bound {fixed.eps_lower_bound:.2f} (best k {best.eps_lower_bound:.2f}) "
                f"claimed {rows[-1]['claimed_eps']:.2f}")
    return {"rows": rows, "m": 1000, "delta": 1e-5, "confidence": 0.95}


def imprint_headline(imp: dict | None) -> dict:
    """imprint_psnr_db_secagg (median PSNR of the server's reconstructions through SecAgg+) and the figure
    under the defence that stops it (client DP-SGD), at the stated batch and cohort."""
    if not imp:
        return {}
    b, n = imp["headline_setting"]["batch_size"], imp["headline_setting"]["cohort"]
    pick = lambda d: next((r for r in imp["rows"] if r["batch_size"] == b and r["cohort"] == n
                           and r["secure_sum"] == "secagg" and r["defence"] == d), None)
    sec, dp, chk = pick("none"), pick("dp-sgd (z=1, C=1)"), pick("model check (client.verify_model)")
    return {"imprint_psnr_db_secagg": sec and sec["psnr_db"],
            "imprint_exact_fraction_secagg": sec and sec["exact_fraction"],
            "imprint_psnr_db_dpsgd": dp and dp["psnr_db"],
            "imprint_exact_fraction_dpsgd": dp and dp["exact_fraction"],
            "imprint_exact_fraction_model_check": chk and chk["exact_fraction"],
            "imprint_setting": f"batch {b}, cohort {n}, digits 8x8, fc-imprint 256 bins, one SGD step, SecAgg+; "
                               "dpsgd: client DP-SGD z=1, C=1; model_check: client.verify_model (clients refuse)"}


def tables(res: dict) -> str:
    """Markdown tables of a results file (for docs/attacks.md)."""
    f = lambda v, d=2: "n/a" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))
    out = []
    if "dlg" in res:
        out += ["| attack | image | label right | PSNR (dB) | SSIM | L-BFGS steps | s / 100 steps |", "|---|---|---|---|---|---|---|"]
        out += [f"| {r['attack']} | {r['image']} | {r['label_ok']} | {f(r['psnr_db'], 1)} | {f(r['ssim'], 3)} | "
                f"{r['iterations']} | {f(r['seconds_per_100_iter'], 1)} |" for r in res["dlg"]["rows"]]
        out.append("")
    if "defenses" in res:
        out += ["| defence | parameters | PSNR (dB) |", "|---|---|---|"]
        for r in res["defenses"]["rows"]:
            par = ", ".join(f"{k}={r[k]}" for k in ("std", "clip", "noise_multiplier") if k in r)
            out.append(f"| {r['defense']} | {par or '-'} | {f(r['psnr_db'], 1)} |")
        out.append("")
    if "ig" in res:
        out += ["| attack | local steps | PSNR (dB) | SSIM | s / 100 iterations |", "|---|---|---|---|---|"]
        out += [f"| {r['attack']} | {r['local_steps']} | {f(r['psnr_db'], 1)} | {f(r['ssim'], 3)} | "
                f"{f(r['seconds_per_100_iter'], 1)} |" for r in res["ig"]["rows"]]
        out.append("")
    if "secagg" in res:
        out += ["| secure sum | dlg observer |", "|---|---|"]
        out += [f"| {k} | {v.get('dlg_status', v.get('error'))} |" for k, v in res["secagg"].items()]
        out.append("")
    if "text" in res:
        out += ["| attack | trained | LoRA r | batch | local steps | optimizer | DP z | recall | precision | ROUGE-1 | ROUGE-2 | exact | s / batch |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for kind, rows in (("bag of words", res["text"].get("film", [])), ("span check", res["text"].get("dager", []))):
            for r in rows:
                tr = "embedding + LoRA (all layers)" if kind == "bag of words" else "LoRA layer 0 only"
                out.append(f"| {kind} ({r['method']}) | {tr} | {r['lora_r']} | {r['batch_size']} | {r['local_steps']} | "
                           f"{r['optimizer']} | {r['noise_multiplier']} | {f(r['token_recall'])} | {f(r['token_precision'])} | "
                           f"{f(r['rouge1'])} | {f(r['rouge2'])} | {f(r['exact'])} | {f(r['seconds'], 1)} |")
        out.append("")
    if "membership" in res:
        out += ["| model | attack | AUC | TPR @ 1% FPR | TPR @ 0.1% FPR | members / non-members | test acc. |",
                "|---|---|---|---|---|---|---|"]
        for k in ("overfit", "dp_eps1"):
            if k in res["membership"]:
                m = res["membership"][k]
                for a in ("loss_threshold", "lira_offline"):
                    out.append(f"| {k} | {a} | {f(m[a]['auc'], 3)} | {f(m[a]['tpr_at_1pct_fpr'], 3)} | "
                               f"{f(m[a]['tpr_at_0.1pct_fpr'], 3)} | {m[a]['members']} / {m[a]['non_members']} | "
                               f"{f(m['test_accuracy_mean'], 3)} |")
        out.append("")
    if "audit" in res:
        out += ["| mechanism | z | rounds | seed | claimed eps | audited bound | best-of-k bound | correct / guesses |",
                "|---|---|---|---|---|---|---|---|"]
        for r in res["audit"]["rows"]:
            out.append(f"| {r['mechanism']} | {r.get('noise_multiplier')} | {r.get('rounds')} | {r.get('seed', 0)} | "
                       f"{f(r['claimed_eps'])} | {f(r['eps_lower_bound'])} | {f(r.get('eps_lower_bound_best_k'))} | "
                       f"{r['correct']} / {r['guesses']} |")
        out.append("")
    if "imprint" in res:
        out += ["| defence | secure sum | batch | cohort | local steps | optimizer | images | exact (PSNR >= 30 dB) | "
                "median PSNR (dB) | round |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["imprint"]["rows"]:
            out.append(f"| {r['defence']} | {r['secure_sum']} | {r['batch_size']} | {r['cohort']} | {r['local_steps']} | "
                       f"{r['optimizer']} | {r['images_trained']} | {r['exact']} ({f(r['exact_fraction'])}) | "
                       f"{f(r['psnr_db'], 1)} | {str(r['status'])[:40]} |")
        out.append("")
    if "lora_trap" in res:
        out += ["| LoRA r | cohort | batch | defence | token recall | token precision | round |", "|---|---|---|---|---|---|---|"]
        for r in res["lora_trap"]["rows"]:
            out.append(f"| {r['lora_r']} | {r['cohort']} | {r['batch_size']} | {r['defence']} | {f(r['token_recall'])} | "
                       f"{f(r['token_precision'])} | {str(r['status'])[:40]} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help="comma list of parts: dlg,ig,defenses,secagg,text,membership,audit,imprint,lora_trap "
                    "(written to results/attacks_parts/, then combine with --merge)")
    ap.add_argument("--loaded", action="store_true", help="record that other work shared the machine")
    ap.add_argument("--merge", action="store_true", help="combine results/attacks_parts/*.json into the results file")
    ap.add_argument("--tables", action="store_true", help="print the results file as Markdown tables")
    args = ap.parse_args()
    if args.tables:
        print(tables(json.loads((ROOT / "benchmarks" / "results" / ("attacks_quick.json" if args.quick else "attacks.json")).read_text())))
        return
    torch.set_num_threads(1)  # 2 shared cores: more threads only spin
    q = args.quick
    parts = set(args.only.split(",")) if args.only else {"dlg", "ig", "defenses", "secagg", "text", "membership", "audit",
                                                           "imprint", "lora_trap"}
    out_path = ROOT / "benchmarks" / "results" / ("attacks_quick.json" if q else "attacks.json")
    parts_dir = ROOT / "benchmarks" / "results" / ("attacks_parts_quick" if q else "attacks_parts")
    res: dict = {}
    t_all = time.perf_counter()
    if args.merge:
        parts = set()
        for f in sorted(parts_dir.glob("*.json")):
            res.update({k: v for k, v in json.loads(f.read_text()).items() if k not in ("headline", "meta")})
        if "dlg_extra" in res:
            res.setdefault("dlg", {"rows": []})["rows"] += res.pop("dlg_extra")["rows"]
        if "dager_extra" in res:
            res.setdefault("text", {}).setdefault("dager", []).extend(res.pop("dager_extra")["rows"])
    if "audit" in parts:
        res["audit"] = bench_audit(q)
    if "dlg" in parts:
        res["dlg"] = bench_dlg(2 if q else 3, 1 if q else 2, 1, 40 if q else 300)
    if "dlg_extra" in parts:  # more seeds, merged into the dlg rows by --merge
        res["dlg_extra"] = bench_dlg(3, 2, 0, 300, skip_digits=3, skip_photos=2)
    if "dager_extra" in parts:
        rows = []
        for r_, bs, steps, z in ((32, 1, 1, 0.0), (64, 2, 1, 0.0), (64, 1, 2, 0.0), (64, 1, 1, 1e-3)):
            r = text_case(text_task(r_, False, [0]), 1, bs, steps, z, "sgd", warm_b=True)
            rows.append({"lora_r": r_, "batch_size": bs, "local_steps": steps, "noise_multiplier": z, "optimizer": "sgd", **r})
            log(f"dager r={r_} bs={bs} steps={steps} z={z}: recall {r['token_recall']:.2f} exact {r['exact']}")
        res["dager_extra"] = {"rows": rows}
    if "defenses" in parts:
        res["defenses"] = bench_defenses(1, 30 if q else 100)
    if "ig" in parts:
        res["ig"] = bench_ig(60 if q else 300)
    if "secagg" in parts:
        res["secagg"] = bench_secagg()
    if "text" in parts:
        res["text"] = bench_text(q)
    if "membership" in parts:
        res["membership"] = bench_membership(q)
    if "imprint" in parts:
        res["imprint"] = bench_imprint(q)
    if "lora_trap" in parts:
        res["lora_trap"] = bench_lora_trap(q)
    if args.only:
        parts_dir.mkdir(parents=True, exist_ok=True)
        res["meta"] = {"seconds": time.perf_counter() - t_all, "machine": machine(loaded=args.loaded),
                       "command": "python benchmarks/attacks.py " + " ".join(sys.argv[1:])}
        (parts_dir / f"{args.only.replace(',', '_')}.json").write_text(json.dumps(res, indent=2, default=float))
        log(f"wrote part {args.only}")
        return
    idlg = [r for r in res.get("dlg", {}).get("rows", []) if r["attack"] == "idlg"]
    conv = [r["psnr_db"] for r in idlg if r["psnr_db"] > 30]
    film = [r for r in res.get("text", {}).get("film", []) if r["batch_size"] == 1 and r["local_steps"] == 1
            and r["noise_multiplier"] == 0 and r["optimizer"] == "sgd"]
    bug = [r for r in res.get("audit", {}).get("rows", []) if r["mechanism"].startswith("planted")]
    res["headline"] = {
        "dlg_converged_fraction": len(conv) / len(idlg) if idlg else None,
        "dlg_median_psnr_db_converged": statistics.median(conv) if conv else None,
        "idlg_label_accuracy": float(np.mean([r["label_ok"] for r in idlg])) if idlg else None,
        "text_token_recall_bs1": film[0]["token_recall"] if film else None,
        "audit_eps_lower_bound_planted_bug": bug[0]["eps_lower_bound"] if bug else None,
    }
    res["headline"].update(imprint_headline(res.get("imprint")))
    lt = {(r["lora_r"], r["cohort"], r["defence"]): r for r in res.get("lora_trap", {}).get("rows", [])}
    if lt:
        res["headline"]["lora_trap_token_recall_secagg_r128_cohort2"] = lt.get((128, 2, "none"), {}).get("token_recall")
    res["meta"] = {"quick": q, "seconds_total_this_invocation": time.perf_counter() - t_all, "torch": torch.__version__,
                   "python": platform.python_version(),
                   "machine": machine(note="merged from results/attacks_parts/: each part's meta.machine says where "
                                           "it ran") if args.merge else machine(loaded=args.loaded),
                   "command": "python benchmarks/attacks.py" + (" --quick" if q else "")}
    out_path.write_text(json.dumps(res, indent=2, default=float))
    log(f"headline: {res['headline']}")
    log(f"wrote {out_path}")


if __name__ == "__main__":
    main()
