"""The grid's report: ``report.md`` (pick a setup from its first screen), PNG plots, CSV/JSONL.

``results.jsonl`` and ``results.csv`` hold one row per cell (every seed);
``summary.csv`` one row per setup (seeds aggregated: mean and sample std).
Plots: ``pareto.png`` (utility vs leakage, marker size = time per round; the
Pareto-optimal setups over accuracy, leakage and cost are starred),
``utility_vs_epsilon.png`` (accuracy and leakage against the claimed epsilon,
one line per defence family) and ``attack_vs_defence.png`` (each attack's
figure per defence).
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

from secfed.compare.metrics import METRICS, aggregate, cell_metrics
from secfed.errors import DataError

ATTACK_AXES = ("attack", "attacks", "adversary", "threat")
NO_ATTACK = ("none", "no-attack", "clean", None)
USELESS_MARGIN = 0.05  # accuracy within 5 points of the majority-class baseline: learnt nothing useful
# a causal LM's next-token accuracy within 1 point of its base model's zero-shot accuracy: learnt nothing (the
# held-out responses of the shipped grids hold ~4000 tokens: a standard error of ~0.007 for one accuracy)
USELESS_MARGIN_ZERO_SHOT = 0.01
AUC_METRICS = ("membership_auc", "canary_auc")
LM_METRICS = ("canary_exposure", "canary_gain", "control_exposure", "extraction")  # causal-LM audits (issue 19)
CHANCE_BITS = 1.4427  # log2(e): the mean exposure of a canary the model never saw (Carlini et al. 2019, Sec. 4)
CURIOUS, MALICIOUS = "curious server", "malicious server"  # the two server column groups of the first screen
LEAK_LABEL = {"psnr": "PSNR (dB)", "malicious_psnr": "PSNR (dB)", "malicious_token_recovery": "token recovery",
              "ssim": "SSIM", "token_recovery": "token recovery", "membership_auc": "MIA AUC",
              "canary_auc": "canary MIA AUC", "canary_exposure": "canary exposure (bits)",
              "canary_gain": "exposure gain over base (bits)", "control_exposure": "control canaries (bits)",
              "extraction": "PII extracted"}


def read_grid(out: Path) -> dict[str, Any]:
    """``grid.json`` of a compare output folder (one DataError line if it is missing or not a grid's)."""
    p = out / "grid.json"
    try:
        grid = json.loads(p.read_text())
        if not isinstance(grid, dict) or not isinstance(grid.get("cells"), list) or "axes" not in grid:
            raise ValueError("no 'cells' list or 'axes'")
        return grid
    except FileNotFoundError:
        raise DataError(f"{out}: no grid.json, so not a `secfed compare` output folder (run the grid first, "
                        "or pass its --out)") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{p}: unreadable ({str(e)[:120]})") from None


def collect(out: Path, grid: dict[str, Any], unreadable: list[str] | None = None) -> list[dict[str, Any]]:
    """One metrics row per cell of ``grid`` (``read_grid(out)``) that has started; a cell whose files cannot be
    read is listed in ``unreadable`` (id and reason) and left out, so one damaged cell never hides the others."""
    rows = []
    for cid in grid["cells"]:
        d = out / "cells" / str(cid)
        if (d / "cell.json").exists():
            try:
                rows.append(cell_metrics(d))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                if unreadable is not None:
                    unreadable.append(f"{cid}: {type(e).__name__}: {str(e)[:120]}")
    return rows


def _fmt(m: str, g: dict[str, Any] | None, sd: bool = True) -> str:
    if g is None:
        return "-"
    if g.get(m) is None:
        if g.get("failed") and not g.get("done"):
            return "failed"
        return "-"
    v, s = g[m], g.get(f"{m}_sd", 0.0)
    if m.startswith("bytes"):
        v, s = v / 1024, s / 1024
    if m == "epsilon" and v > 1e6:
        return "inf"
    if m.startswith("bytes") or m in ("peak_rss_mb", "psnr", "malicious_psnr"):
        txt = f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"
    else:
        txt = f"{v:.3g}" if abs(v) >= 100 or m == "epsilon" else f"{v:.3f}"
    if sd and g.get(f"{m}_n", 1) > 1:
        txt += f" ± {s:.2g}"
    return txt


def _split_axes(grid: dict[str, Any]) -> tuple[list[str], str | None]:
    axes = list(grid["axes"])
    attack = next((a for a in axes if a.lower() in ATTACK_AXES), None)
    return [a for a in axes if a != attack], attack


def pick_table(groups: list[dict[str, Any]], grid: dict[str, Any]) -> tuple[list[str], list[list[str]], list[dict]]:
    """The first-screen table: one row per defence setup, one column per attack's headline figure."""
    setup_axes, attack_axis = _split_axes(grid)
    rows: dict[tuple, dict[str, Any]] = {}
    for g in groups:
        key = tuple(g.get(f"axis.{a}") for a in setup_axes)
        rows.setdefault(key, {})[g.get(f"axis.{attack_axis}") if attack_axis else None] = g
    attacks = grid["axes"].get(attack_axis, {}) if attack_axis else {}
    cols = ["setup", "accuracy", "epsilon", "MIA AUC", "canary MIA AUC"] + [LEAK_LABEL[m] for m in LM_METRICS]
    attack_cols: list[tuple[str, str, str]] = []  # (attack label, metric, column title)
    curious: list[tuple[str, str, str]] = []  # an observer on what the secure sum reveals (honest-but-curious)
    malicious: list[tuple[str, str, str]] = []  # a server that ships crafted weights (attack.server)
    for lab in attacks:
        cand = [g for r in rows.values() for a, g in r.items() if a == lab]
        if any(g.get("server_attack") for g in cand):
            m = "malicious_token_recovery" if any(g.get("malicious_token_recovery") is not None for g in cand) \
                else "malicious_psnr"
            malicious.append((lab, m, f"{MALICIOUS} · {lab}: {LEAK_LABEL[m]}"))
        elif any(g.get("inversion_attack") for g in cand):
            m = "psnr" if any(g.get("psnr") is not None for g in cand) else "token_recovery" \
                if any(g.get("token_recovery") is not None or g.get("inversion_attack") == "text" for g in cand) \
                else "psnr"
            curious.append((lab, m, f"{CURIOUS} · {lab}: {LEAK_LABEL[m]}"))
        elif any(g.get("adversary") for g in cand):
            attack_cols.append((lab, "accuracy", f"{lab}: accuracy"))
            if any(g.get("backdoor_success") is not None for g in cand):
                attack_cols.append((lab, "backdoor_success", f"{lab}: backdoor success"))
    attack_cols = curious + malicious + attack_cols  # column groups: curious server, malicious server, clients
    cols += [c[2] for c in attack_cols] + ["s/round", "KB up/client", "KB down/client", "peak MB"]
    table, raw = [], []
    for key, by_attack in rows.items():
        # utility, MIA and cost come only from the setup's cell without attack (an attack value may change
        # training): the attack value named "none", else the cell with no hostile client or server and no
        # observer setting (an honest secret holder's planted cell counts: metrics.planted)
        base = next((g for a, g in by_attack.items() if a in NO_ATTACK), None) or next(
            (g for g in by_attack.values() if not (g.get("adversary") or g.get("server_attack")
                                                   or g.get("inversion_attack"))), None) or {}
        mia = base
        label = ", ".join(f"{v}" for v in key) or "base"
        if not any(g.get("done") for g in by_attack.values()):
            errs = sorted({e for g in by_attack.values() for e in g.get("errors", [])})
            failed = any(g.get("failed") for g in by_attack.values())
            line = [label, ("failed: " + errs[0][:90]) if failed and errs else "not run yet"] + ["-"] * (len(cols) - 2)
            table.append(line)
            raw.append({"setup": label, "attacks": {}})
            continue
        line = [label, _fmt("accuracy", base), _fmt("epsilon", base, sd=False), _fmt("membership_auc", mia),
                _fmt("canary_auc", mia)] + [_fmt(m, base) for m in LM_METRICS]
        info = {"setup": label, "accuracy": base.get("accuracy"), "epsilon": base.get("epsilon"),
                "membership_auc": mia.get("membership_auc"), "canary_auc": mia.get("canary_auc"),
                "seconds_per_round": base.get("seconds_per_round"), "majority_baseline": base.get("majority_baseline"),
                "zero_shot_accuracy": base.get("zero_shot_accuracy"),
                "bytes_up_per_client": base.get("bytes_up_per_client"), **{m: base.get(m) for m in LM_METRICS},
                "attacks": {}}
        for lab, m, title in attack_cols:
            g = by_attack.get(lab)
            if g is not None and m in ("psnr", "token_recovery") and g.get("inversion_blocked"):
                line.append(f"blocked ({g['secure_sum']}: no per-client update)")
                info["attacks"][title] = "blocked"
            elif g is not None and m.startswith("malicious_") and g.get(m) is None and g.get("attack_status"):
                line.append(f"stopped ({g['attack_status'][:60]})")  # e.g. the clients refused the crafted model
                info["attacks"][title] = None
            elif g is not None and m in ("psnr", "token_recovery") and g.get(m) is None and g.get("attack_status"):
                line.append(f"n/a ({g['attack_status'][:60]})")
                info["attacks"][title] = None
            else:
                line.append(_fmt(m, g))
                info["attacks"][title] = g.get(m) if g else None
        line += [_fmt("seconds_per_round", base), _fmt("bytes_up_per_client", base),
                 _fmt("bytes_down_per_client", base), _fmt("peak_rss_mb", base, sd=False)]
        table.append(line)
        raw.append(info)
    keep = [i for i in range(len(cols)) if i == 0 or any(r[i] not in ("-",) for r in table)]
    return [cols[i] for i in keep], [[r[i] for i in keep] for r in table], raw


# ---------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_front(points: list[tuple[float, ...]], rel_tol: tuple[float, ...] | None = None) -> list[int]:
    """Indices of the non-dominated points; every coordinate is to be minimised. ``rel_tol[k]``: values of
    coordinate k within that relative distance count as equal (timing noise must not decide the front)."""
    tol = rel_tol or (0.0,) * (len(points[0]) if points else 0)

    def better(a: float, b: float, k: int) -> bool:  # a strictly better than b on coordinate k
        return a < b - tol[k] * abs(b)

    def no_worse(a: float, b: float, k: int) -> bool:
        return a <= b + tol[k] * abs(b)

    front = []
    for i, p in enumerate(points):
        dominated = any(all(no_worse(q[k], p[k], k) for k in range(len(p))) and any(better(q[k], p[k], k)
                                                                                    for k in range(len(p)))
                        for j, q in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


TIME_TOLERANCE = 0.05  # seconds per round within 5% are a tie on the Pareto front (run-to-run noise)
LEAK_TOLERANCE = 0.01  # leakage within 1% is a tie (e.g. an exact secure sum's last-bit differences)


def _leak_metric(raw: list[dict[str, Any]]) -> str | None:
    """The leakage axis of the Pareto plot: the worst-case memorisation figure the grid has (canary AUC of
    planted wrong-label canaries, or the secret sharer's exposure gain), else the natural MIA AUC."""
    return next((m for m in ("canary_auc", "canary_gain", "membership_auc") if any(r.get(m) is not None for r in raw)),
                None)


def baseline(r: dict[str, Any]) -> tuple[float, str] | None:
    """The accuracy below which the setup learnt nothing, and its description: the majority class, else the
    base model's zero-shot accuracy (each with its margin)."""
    if r.get("majority_baseline") is not None:
        return r["majority_baseline"] + USELESS_MARGIN, f"within {USELESS_MARGIN:g} of the majority-class accuracy"
    if r.get("zero_shot_accuracy") is not None:
        return (r["zero_shot_accuracy"] + USELESS_MARGIN_ZERO_SHOT,
                f"within {USELESS_MARGIN_ZERO_SHOT:g} of the base model's zero-shot accuracy")
    return None


def useless(r: dict[str, Any]) -> bool:
    """No better than its baseline (``baseline``: the majority class or the base model, with a margin): never
    recommended."""
    base = baseline(r)
    return base is not None and r["accuracy"] < base[0]


def plot_pareto(raw: list[dict[str, Any]], path: Path) -> list[str]:
    """Accuracy vs leakage (canary or natural MIA AUC), marker size = s/round; returns the Pareto-optimal setups.

    Setups no better than their baseline (``useless``) leak nothing because they learnt nothing;
    they are drawn (grey crosses) but kept out of the front.
    """
    leak = _leak_metric(raw)
    pts = [r for r in raw if r.get("accuracy") is not None and r.get("seconds_per_round") is not None
           and (leak is None or r.get(leak) is not None)]
    if not pts:
        return []
    xs = [r[leak] if leak else r["seconds_per_round"] for r in pts]
    ok = [i for i, r in enumerate(pts) if not useless(r)]
    objs = [(-pts[i]["accuracy"], pts[i][leak] if leak else 0.0, pts[i]["seconds_per_round"]) for i in ok]
    front = {ok[j] for j in pareto_front(objs, (0.0, LEAK_TOLERANCE, TIME_TOLERANCE))}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    smax = max(r["seconds_per_round"] for r in pts) or 1.0
    for i, (r, x) in enumerate(zip(pts, xs)):
        on = i in front
        size = 40 + 400 * r["seconds_per_round"] / smax
        if useless(r):
            ax.scatter(x, r["accuracy"], s=size, marker="x", color="tab:gray", alpha=0.6, zorder=3)
        else:
            ax.scatter(x, r["accuracy"], s=size, marker="*" if on else "o", color="tab:green" if on else "tab:gray",
                       alpha=0.9 if on else 0.5, edgecolor="k", zorder=4 if on else 3)
        ax.annotate(r["setup"], (x, r["accuracy"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(f"{LEAK_LABEL[leak]} (lower = less leakage)" if leak else "seconds per round (lower = cheaper)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Pareto front: accuracy / leakage / time (star = not dominated; x = no better than the majority "
                 "class; size = s/round)", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [pts[i]["setup"] for i in sorted(front)]


def _family(label: str) -> str:
    return re.sub(r"(eps|epsilon|e)?[0-9][0-9.]*", "", label).strip("-_,. ") or label


def plot_utility_vs_epsilon(raw: list[dict[str, Any]], inv_title: str | None, path: Path) -> bool:
    dp = [r for r in raw if r.get("epsilon") is not None and r["epsilon"] < 1e6]
    if not dp:
        return False
    nodp = [r for r in raw if r.get("epsilon") is None]
    panels = [("accuracy", "test accuracy")]
    panels += [(m, LEAK_LABEL[m]) for m in AUC_METRICS + ("canary_exposure", "canary_gain")
               if any(r.get(m) is not None for r in raw)]
    if inv_title and any(isinstance(r["attacks"].get(inv_title), float) for r in raw):
        panels.append((inv_title, inv_title))
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    fams: dict[str, list[dict[str, Any]]] = {}
    for r in dp:
        fams.setdefault(_family(r["setup"]), []).append(r)

    def val(r: dict[str, Any], m: str) -> float | None:
        v = r.get(m) if m in r else r["attacks"].get(m)
        return v if isinstance(v, float) else None

    for ax, (m, title) in zip(axes[0], panels):
        for fam, rs in fams.items():
            rs = sorted((r for r in rs if val(r, m) is not None), key=lambda r: r["epsilon"])
            if rs:
                ax.plot([r["epsilon"] for r in rs], [val(r, m) for r in rs], "o-", label=fam)
        ref = next((r for r in nodp if val(r, m) is not None), None)  # the first setup without DP: the baseline
        if ref is not None:
            ax.axhline(val(ref, m), ls="--", lw=1, color="gray")
            ax.annotate(f"{ref['setup']} (no DP)", (0.02, val(ref, m)), xycoords=("axes fraction", "data"), fontsize=7)
        if m in AUC_METRICS:  # a fixed scale around chance, so seed noise does not read as a trend
            lo, hi = ax.get_ylim()
            ax.set_ylim(min(0.4, lo), max(0.9, hi))
            ax.axhline(0.5, ls=":", lw=1, color="k")
            ax.annotate("chance", (0.98, 0.5), xycoords=("axes fraction", "data"), fontsize=7, ha="right", va="bottom")
        if m in ("canary_exposure", "canary_gain"):  # chance: a never-seen canary / nothing added by training
            chance = CHANCE_BITS if m == "canary_exposure" else 0.0
            ax.axhline(chance, ls=":", lw=1, color="k")
            ax.annotate("never seen" if chance else "no gain", (0.98, chance), xycoords=("axes fraction", "data"),
                        fontsize=7, ha="right", va="bottom")
        ax.set_xscale("log")
        ticks = sorted({float(f"{r['epsilon']:.2g}") for r in dp})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("claimed epsilon")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_attack_vs_defence(raw: list[dict[str, Any]], path: Path) -> bool:
    titles = sorted({t for r in raw for t, v in r["attacks"].items() if v is not None})
    if not titles:
        return False
    plt = _plt()
    rows = max(sum(r["attacks"].get(t) is not None for r in raw) for t in titles)
    ncol = min(3, len(titles))
    nrow = -(-len(titles) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.4 * ncol, (0.35 * rows + 1.4) * nrow), squeeze=False)
    for ax in axes.flat[len(titles):]:
        ax.set_visible(False)
    for ax, t in zip(axes.flat, titles):
        have = [r for r in raw if r["attacks"].get(t) is not None]
        labels = [r["setup"] for r in have]
        vals = [r["attacks"].get(t) for r in have]
        ax.barh(labels, [v if isinstance(v, float) else 0 for v in vals], color="tab:red", alpha=0.7)
        for i, v in enumerate(vals):
            txt = "blocked" if v == "blocked" else ("-" if v is None else f"{v:.3g}")
            ax.annotate(txt, (v if isinstance(v, float) else 0, i), fontsize=7, va="center", xytext=(3, 0),
                        textcoords="offset points")
        ax.set_title(t, fontsize=9)
        ax.invert_yaxis()
        ax.grid(alpha=0.3, axis="x")
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------- files
def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k, v in r.items() if k not in keys and not isinstance(v, (dict, list))]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in keys})


def _md_table(cols: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + ["| " + " | ".join(r) + " |" for r in rows]


COLUMN_NOTES: dict[str, str] = {  # what a first-screen column means, written only when the column is there
    "accuracy": "accuracy: the task's test accuracy; for a causal LM, next-token accuracy on the held-out responses",
    "epsilon": "epsilon: the privacy ledger's epsilon at the run's delta (`-`: no differential privacy)",
    "MIA AUC": "MIA AUC: membership inference on the final model, training vs held-out records "
               "(classification: loss threshold; causal LM: the loss calibrated by the base model's, the loss, "
               "zlib and min-k% AUCs are in the cell's audit); 0.5 = no leakage",
    "canary MIA AUC": "canary MIA AUC: the loss attack on planted wrong-label canaries, in vs out (worst-case "
                      "memorisation)",
    LEAK_LABEL["canary_exposure"]: "canary exposure: the secret sharer's exposure (bits) of the most exposed "
                                   "planted canary, of a space of log2 |R| bits",
    LEAK_LABEL["canary_gain"]: "exposure gain: the canaries' exposure on the trained model minus on the base "
                               "model (what training added; the largest over insertion counts)",
    LEAK_LABEL["control_exposure"]: "control canaries: the mean exposure of never-inserted canaries of the same "
                                    f"format (~{CHANCE_BITS:.2f} bits when the model learnt nothing about them)",
    LEAK_LABEL["extraction"]: "PII extracted: the fraction of one client's PII records that greedy prompting "
                              "with their prefix recovers verbatim",
    "s/round": "cost: seconds per round, KB sent up and down per participating client per round, and the "
               "cell process's peak resident memory (MB)",
}


def _preamble(cols: list[str]) -> list[str]:
    """What the first screen's columns mean: a sentence, then one bullet per kind of column shown."""
    notes = [f"- {v}" for k, v in COLUMN_NOTES.items() if k in cols]
    if any(c.startswith(CURIOUS) for c in cols):
        notes.append(f"- `{CURIOUS} ·` columns: an honest-but-curious server's attack on what the secure sum "
                     "reveals, its best reconstruction over rounds; `blocked`: the server saw no per-client update")
    if any(c.startswith(MALICIOUS) for c in cols):
        notes.append(f"- `{MALICIOUS} ·` columns: a server that ships crafted weights and reads the secure sum, "
                     "median PSNR of its reconstructions")
    if any(c.endswith(": accuracy") for c in cols):
        notes.append("- `<attack>: accuracy`: the final accuracy under that poisoning attack")
    return ["Accuracy, epsilon, membership, memorisation and cost come from the setup's run without a hostile "
            "client or server; an attack column is that attack's figure against the setup.", ""] + notes


def write_report(out: Path) -> Path:
    """Read every cell under ``out`` and write report.md, the plots, results.{jsonl,csv}, summary.csv."""
    out = Path(out)
    grid = read_grid(out)
    unreadable: list[str] = []
    rows = collect(out, grid, unreadable)
    groups = aggregate(rows)
    with (out / "results.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    _write_csv(out / "results.csv", rows)
    _write_csv(out / "summary.csv", groups)
    cols, table, raw = pick_table(groups, grid)
    inv = next((c for c in cols if c.endswith(("PSNR (dB)", "token recovery"))), None)
    front = plot_pareto(raw, out / "pareto.png")
    has_eps = plot_utility_vs_epsilon(raw, inv, out / "utility_vs_epsilon.png")
    has_att = plot_attack_vs_defence(raw, out / "attack_vs_defence.png")
    done = sum(r["status"] == "done" for r in rows)
    failed = [r for r in rows if r["status"] == "failed"]
    src = grid.get("source") or "GRID.toml"
    lines = [f"# Trade-offs: `{grid['name']}`", "", f"Command: `secfed compare {src}` (rerun it to complete missing or "
             "failed cells; `--report-only` rewrites this report).", "",
             f"{done} of {len(rows)} cells done, {len(failed)} failed; seeds {grid['seeds']} "
             "(figures are mean ± sample std over seeds).", ""] + _preamble(cols) + [""]
    lines += _md_table(cols, table)
    lines.append("")
    if front:
        why = sorted({b[1] for r in raw if r.get("accuracy") is not None and (b := baseline(r)) is not None})
        lines += [f"Not dominated on (accuracy, {LEAK_LABEL.get(_leak_metric(raw) or '', 'leakage')}, time per round; "
                  f"leakage within {LEAK_TOLERANCE:.0%} and times within {TIME_TOLERANCE:.0%} count as equal): "
                  f"**{', '.join(front)}**"
                  + (f" (setups {' or '.join(why)} are left out: they leak nothing because they learnt nothing)"
                     if why else "") + ".", "",
                  "![Pareto front](pareto.png)", ""]
    lines += ["## Plots", ""]
    if has_eps:
        lines += ["Utility and leakage against the claimed epsilon (dashed: setups without DP):", "",
                  "![utility vs epsilon](utility_vs_epsilon.png)", ""]
    if has_att:
        lines += ["Each attack's figure per defence:", "", "![attack vs defence](attack_vs_defence.png)", ""]
    lines += ["## All cells", ""]
    detail_cols = ["cell", "status"] + [m for m in METRICS if any(r.get(m) is not None for r in rows)]
    lines += _md_table(detail_cols, [[str(r["cell"]), str(r["status"])] + [_fmt(m, r, sd=False) for m in detail_cols[2:]]
                                     for r in rows])
    if failed:
        lines += ["", "## Failed cells", ""]
        lines += [f"- `{r['cell']}`: {r.get('error')} (log: `cells/{r['cell']}/log.txt`)" for r in failed]
    if unreadable:
        lines += ["", "## Unreadable cells (left out of every table)", ""] + [f"- `{u}`" for u in unreadable]
    lines += ["", "Files: `results.jsonl` / `results.csv` (one row per cell), `summary.csv` (per setup), "
              "`cells/<cell>/run/` (each run's report, rounds.jsonl, checkpoint), `grid.json`.", ""]
    p = out / "report.md"
    p.write_text("\n".join(lines))
    return p
