"""Markdown report with PNG plots for one run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def plot_rounds(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = [r for r in records if "accuracy" in r]
    fig, ax1 = plt.subplots(figsize=(6, 3.5))
    ax1.plot([r["round"] for r in ev], [r["accuracy"] for r in ev], "o-", color="tab:blue", label="test accuracy")
    ax1.set_xlabel("round")
    ax1.set_ylabel("accuracy", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot([r["round"] for r in ev], [r["loss"] for r in ev], "s--", color="tab:red", label="test loss")
    ax2.set_ylabel("loss", color="tab:red")
    ax1.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_run_report(run_dir: Path, summary: dict[str, Any]) -> Path:
    from secfed.engine import read_rounds

    recs = read_rounds(run_dir)
    if recs:
        plot_rounds(recs, run_dir / "accuracy_loss.png")
    lines = [f"# Run `{summary['name']}`", ""]
    acc, base = summary.get("final_accuracy"), summary.get("majority_baseline")
    if acc is not None:
        lines.append(f"Final test accuracy **{acc:.3f}** (majority-class baseline {base:.3f}) after "
                     f"{summary['rounds_completed']} of {summary['rounds_planned']} rounds, "
                     f"{_fmt(summary['seconds_per_round'])} s per round.")
    if summary.get("epsilon") is not None:
        lines.append(f"Privacy spent: epsilon = {summary['epsilon']:.3f} at delta = {_fmt(summary.get('delta'))} "
                     "(from `privacy_ledger.jsonl`).")
    if summary.get("stopped"):
        lines.append(f"Stopped early: {summary['stopped']}.")
    lines += ["", "![accuracy and loss per round](accuracy_loss.png)", ""]
    cols = ["round", "completed", "dropped", "accuracy", "loss", "epsilon", "bytes_up", "seconds"]
    cols = [c for c in cols if any(c in r for r in recs)]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for r in recs:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    lines += ["", "Files: `rounds.jsonl` (one line per round), `summary.json`, `checkpoint/` (safetensors), "
              "`privacy_ledger.jsonl` (append-only)."]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def summary_line(summary: dict[str, Any]) -> str:
    parts = [f"{summary['name']}: {summary['rounds_completed']} rounds"]
    if summary.get("final_accuracy") is not None:
        parts.append(f"accuracy {summary['final_accuracy']:.3f} (majority baseline {summary['majority_baseline']:.3f})")
    if summary.get("epsilon") is not None:
        parts.append(f"epsilon {summary['epsilon']:.3f}")
    parts.append(f"{summary['seconds_per_round']:.2f} s/round" if summary.get("seconds_per_round") else "")
    return ", ".join(p for p in parts if p)

