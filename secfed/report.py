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


def _rounds_text(summary: dict[str, Any]) -> str:
    """"2 of 3 rounds aggregated" (aborted rounds are attempted, not aggregated)."""
    done = summary.get("rounds_aggregated", summary["rounds_completed"])
    text = f"{done} of {summary['rounds_planned']} rounds aggregated"
    if summary["rounds_completed"] != done:
        text += f" ({summary['rounds_completed'] - done} aborted)"
    return text


def _data_lines(data: dict[str, Any]) -> list[str]:
    lines = ["## Data", "",
             f"- train {data['train_size']} examples, test {data['test_size']}, server root {data['root_size']}"
             + (f", canaries {data['canaries']}" if data.get("canaries") else "")]
    sh = data.get("shards")
    if sh:
        sizes = data.get("shard_sizes")
        listed = f": {', '.join(str(x) for x in sizes)}" if sizes else ""
        lines.append(f"- {sh['clients']} clients' shards: min {sh['min']}, median {sh['median']:g}, max {sh['max']}{listed}")
    classes = data.get("classes") or []
    if classes:
        lines += ["", "| class | train | test |", "|---|---|---|"]
        for c in classes[:50]:
            lines.append(f"| {c['name']} | {c['train']} | {c['test']} |")
        if len(classes) > 50:
            lines.append(f"| ... {len(classes) - 50} more | | |")
    return lines + [""]


def _cell(text: str, limit: int = 300) -> str:
    t = " ".join(str(text).split()).replace("|", "\\|")
    return t if len(t) <= limit else t[: limit - 3] + "..."


def _sample_lines(run_dir: Path) -> list[str]:
    """The table of sample generations (``samples.json``, written by generative tasks)."""
    p = run_dir / "samples.json"
    if not p.is_file():
        return []
    rows = json.loads(p.read_text())
    lines = ["", "## Sample generations (test split, greedy)", "", "| prompt | reference | base model | federated model |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(k, "")) for k in ("prompt", "reference", "base", "federated")) + " |")
    return lines


def write_run_report(run_dir: Path, summary: dict[str, Any]) -> Path:
    from secfed.engine import read_rounds

    recs = read_rounds(run_dir)
    if recs:
        plot_rounds(recs, run_dir / "accuracy_loss.png")
    lines = [f"# Run `{summary['name']}`", ""]
    if summary.get("failed"):
        lines += [f"**This run failed: {summary['failed']}.**", ""]
    acc, base = summary.get("final_accuracy"), summary.get("majority_baseline")
    if acc is not None:
        base_s = f" (majority-class baseline {base:.3f})" if isinstance(base, (int, float)) else ""
        lines.append(f"Final test accuracy **{acc:.3f}**{base_s} after {_rounds_text(summary)}, "
                     f"{_fmt(summary['seconds_per_round'])} s per round.")
    else:
        lines.append(f"After {_rounds_text(summary)}.")
    zs = {k[len("zero_shot_"):]: v for k, v in summary.items() if k.startswith("zero_shot_") and v is not None}
    if zs:  # generative tasks: the base model with the adapter disabled
        final = next((r for r in reversed(recs) if "accuracy" in r), {})
        lines.append("Zero-shot base model (adapter disabled): " + ", ".join(f"{k} {_fmt(v)}" for k, v in zs.items())
                     + "; federated model (last evaluation): "
                     + ", ".join(f"{k} {_fmt(final[k])}" for k in zs if final.get(k) is not None) + ".")
    if summary.get("stopped"):
        lines.append(f"Stopped early: {summary['stopped']}.")
    g = summary.get("guarantee")
    lines += ["", "## What was protected, and against whom", ""]
    if g:
        lines.append(g["sentence"])
        if g.get("epsilon_vs_server_note"):
            vs = g.get("epsilon_vs_server")
            lines.append("")
            lines.append(f"Against the server: " + (f"epsilon = {vs:.3g} ({g['epsilon_vs_server_note']})."
                                                     if isinstance(vs, (int, float)) else f"{g['epsilon_vs_server_note']}."))
    if summary.get("epsilon") is not None:
        lines += ["", f"Privacy spent: epsilon = {summary['epsilon']:.3f} at delta = {_fmt(summary.get('delta'))} "
                  "(from `privacy_ledger.jsonl`)."]
    lines.append("")
    if summary.get("warnings"):
        lines += ["## Warnings", ""] + [f"- {w}" for w in summary["warnings"]] + [""]
    if summary.get("data"):
        lines += _data_lines(summary["data"])
    lines += ["![accuracy and loss per round](accuracy_loss.png)", ""]
    cols = ["round", "status", "completed", "dropped", "accuracy", "loss", "epsilon", "bytes_up", "seconds"]
    cols = [c for c in cols if any(c in r for r in recs)]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for r in recs:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    lines += _sample_lines(run_dir)
    lines += ["", "Files: `rounds.jsonl` (one line per round), `summary.json`, `checkpoint/` (safetensors), "
              "`privacy_ledger.jsonl` (append-only)."]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def summary_line(summary: dict[str, Any]) -> str:
    parts = [f"{summary['name']}: {_rounds_text(summary)}"]
    if summary.get("final_accuracy") is not None:
        base = summary.get("majority_baseline")
        parts.append(f"accuracy {summary['final_accuracy']:.3f}"
                     + (f" (majority baseline {base:.3f})" if isinstance(base, (int, float)) else ""))
    g = summary.get("guarantee") or {}
    if summary.get("epsilon") is not None:
        parts.append(f"epsilon {summary['epsilon']:.3f}" + (f" ({g['short']})" if g.get("short") else ""))
    parts.append(f"{summary['seconds_per_round']:.2f} s/round" if summary.get("seconds_per_round") else "")
    return ", ".join(p for p in parts if p)
