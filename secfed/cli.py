"""The ``secfed`` command line: ``run`` (train), and the entry points later issues add."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from secfed.errors import SecfedError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="secfed: privacy- and security-hardened federated fine-tuning of foundation models.")


@app.callback()
def _root() -> None:
    """secfed: privacy- and security-hardened federated fine-tuning of foundation models."""


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)


def _silence() -> None:
    """--quiet: no loading bars or log lines from transformers / huggingface_hub (read at their import)."""
    import os

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def _interrupted(engine, config: Path, sets: list[str], resume: bool) -> None:
    """SIGINT during ``run``: say what was saved and how to continue, exit 130."""
    import shlex

    extra = "".join(f" --set {shlex.quote(s)}" for s in sets)
    if engine == "flower":
        typer.echo(f"interrupted; if a round finished, continue with: secfed run {config}{extra} --resume "
                   "(same --out/--transport), else rerun without --resume", err=True)
    elif engine is None:
        typer.echo("interrupted before the run started; nothing was saved", err=True)
    elif engine.last_saved > 0:
        typer.echo(f"interrupted: rounds 1-{engine.last_saved} are saved in {engine.out}/checkpoint; continue with: "
                   f"secfed run {config} --out {engine.out}{extra} --resume", err=True)
    else:
        again = f"secfed run {config} --out {engine.out}{extra}"
        typer.echo(f"interrupted before the first round finished: no checkpoint in {engine.out}, nothing to resume; "
                   f"start again without --resume: {again}", err=True)
    raise typer.Exit(130)


def _overrides(sets: list[str]) -> dict:
    import tomllib

    out = {}
    for s in sets:
        if "=" not in s:
            raise SecfedError(f"--set '{s}': expected KEY=VALUE, e.g. --set run.rounds=3")
        k, v = s.split("=", 1)
        try:
            out[k.strip()] = tomllib.loads(f"x = {v}")["x"]
        except tomllib.TOMLDecodeError:
            out[k.strip()] = v
    return out


@app.command()
def run(config: Path = typer.Argument(..., help="experiment TOML, e.g. experiments/quickstart.toml"),
        resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last checkpoint"),
        out: Optional[Path] = typer.Option(None, "--out", help="run directory (default: runs/<run.name>)"),
        set_: list[str] = typer.Option([], "--set", help="override a key, e.g. --set run.rounds=3"),
        quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
        transport: Optional[str] = typer.Option(None, "--transport", help="inprocess (default), flower-ray (Flower "
                                                "simulation on Ray) or flower (local SuperLink + SuperNodes, TLS)")) -> None:
    """Train: run the federated experiment CONFIG and write rounds.jsonl, summary.json and report.md."""
    if quiet:
        _silence()
    engine = None
    try:
        from secfed.config import load_config
        from secfed.engine import Engine
        from secfed.report import summary_line

        cfg = load_config(config, {**_overrides(set_), **({"deploy.transport": transport} if transport else {})})
        if cfg.deploy.transport != "inprocess":
            from secfed.flower.deploy import run_flower

            engine = "flower"  # no local engine: _interrupted says how to continue
            summary = run_flower(cfg, out, resume=resume)
            run_dir = Path(summary["out"])
        else:
            engine = Engine(cfg, out, resume=resume, progress=not quiet)
            for w in engine.warnings:
                typer.echo(f"warning: {w}", err=True)
            summary = engine.run()
            run_dir = engine.out
    except SecfedError as e:
        _fail(e)
        return
    except KeyboardInterrupt:
        _interrupted(engine, config, set_, resume)
        return
    typer.echo(summary_line(summary))
    typer.echo(f"report: {run_dir / 'report.md'}")
    if summary.get("failed"):  # a run that trained nothing, or ended non-finite, is not a success
        typer.echo(f"error: run '{summary['name']}' failed: {summary['failed']}", err=True)
        raise typer.Exit(1)


@app.command()
def compare(grid: Path = typer.Argument(..., help="grid TOML, e.g. experiments/tradeoffs_digits.toml"),
            out: Optional[Path] = typer.Option(None, "--out", help="output folder (default: runs/compare/<grid name>)"),
            retries: int = typer.Option(1, "--retries", help="times a crashed cell is retried"),
            report_only: bool = typer.Option(False, "--report-only", help="rewrite the report from finished cells"),
            quiet: bool = typer.Option(False, "--quiet", help="no progress bars")) -> None:
    """Compare: run every cell of GRID (resumable; done cells are skipped) and write report.md with plots."""
    if quiet:
        _silence()
    try:
        from secfed.compare import load_grid, run_grid
        from secfed.compare.report import write_report

        g = load_grid(grid)
        dest = out or Path("runs/compare") / g.name
        if report_only:
            write_report(dest)
            statuses = {}
        else:
            statuses = run_grid(g, dest, progress=not quiet, retries=retries)
    except SecfedError as e:
        _fail(e)
        return
    failed = [k for k, v in statuses.items() if v.get("status") == "failed"]
    typer.echo(f"{len(statuses) - len(failed)} cells done, {len(failed)} failed" if statuses else "report rewritten")
    typer.echo(f"report: {dest / 'report.md'}")


@app.command()
def audit(target: Path = typer.Argument(..., help="a finished run directory (runs/<name>) or an experiment TOML to run first"),
          attacks: str = typer.Option("membership", "--attacks", help="comma-separated: membership, backdoor, "
                                      "or observer names (dlg, text-inversion, dp-audit) replayed on the run's protocol, "
                                      "or one malicious-server attack (imprint) that crafts the replayed round's model"),
          out: Optional[Path] = typer.Option(None, "--out", help="audit folder (default: RUN_DIR/audit)"),
          quiet: bool = typer.Option(False, "--quiet", help="no progress bar")) -> None:
    """Audit: run ATTACKS against what a run's server saw and its final model; write audit.md."""
    if quiet:
        _silence()
    try:
        from secfed.compare.post_run import audit_run, validate_attacks

        names = [a.strip() for a in attacks.split(",") if a.strip()]
        validate_attacks(names)  # before any run or file
        run_dir = target
        if target.is_file():
            from secfed.config import load_config
            from secfed.engine import Engine

            cfg = load_config(target)
            engine = Engine(cfg, None, progress=not quiet)
            summary = engine.run()
            run_dir = engine.out
            if summary.get("failed"):
                raise SecfedError(f"run '{summary['name']}' failed: {summary['failed']}; nothing to audit")
        report = audit_run(run_dir, names, out, progress=not quiet)
    except SecfedError as e:
        _fail(e)
        return
    bad = [v for v in report["verdicts"] if v["verdict"] == "contradicts"]
    dest = out or run_dir / "audit"
    if report.get("previous_audit"):
        typer.echo(f"the previous audit was moved to {report['previous_audit']} (nothing is overwritten)")
    typer.echo(f"audit: {dest / 'audit.md'}" + (f" ({len(bad)} figure(s) contradict the claimed epsilon)" if bad else ""))


@app.command()
def generate(run_dir: Path = typer.Argument(..., help="a finished generative run (runs/<name>)"),
             prompt: Optional[str] = typer.Option(None, "--prompt", help="one prompt (rendered with the chat template)"),
             prompts: Optional[Path] = typer.Option(None, "--prompts", help="a file: one prompt per line, or JSONL with "
                                                    "'prompt', 'instruction'/'input' or 'messages'"),
             max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1,
                                                          help="default: the run's data.max_new_tokens"),
             adapter: Optional[Path] = typer.Option(None, "--adapter", help="adapter folder (default: RUN_DIR/adapter)")) -> None:
    """Generate: greedy answers of the run's base model with its federated LoRA adapter."""
    import json

    if (prompt is None) == (prompts is None):
        _fail(SecfedError("give exactly one of --prompt TEXT or --prompts FILE"))
    _silence()
    try:
        from secfed.export import generate as gen, load_causal_run, read_prompts

        cfg, model, tok = load_causal_run(run_dir, adapter)
        items = [prompt] if prompt is not None else read_prompts(prompts, cfg)
        n = max_new_tokens or getattr(cfg.data, "max_new_tokens", 48)
        outs = gen(model, tok, items, n, getattr(cfg.data, "system_prompt", None))
    except SecfedError as e:
        _fail(e)
        return
    if prompt is not None:
        typer.echo(outs[0])
        return
    for p, o in zip(items, outs):
        shown = p if isinstance(p, str) else p[-1]["content"]
        typer.echo(json.dumps({"prompt": shown, "output": o}, ensure_ascii=False))


@app.command()
def predict(run_dir: Path = typer.Argument(..., help="a finished classifier run (runs/<name>)"),
            file: Path = typer.Argument(..., help="CSV or JSONL with the run's text column (data.text_column)"),
            out: Optional[Path] = typer.Option(None, "--out", help="output file (default: FILE.predictions.csv/jsonl)")) -> None:
    """Predict: label every row of FILE with a classifier run (adds 'prediction' and 'confidence')."""
    _silence()
    try:
        from secfed.export import predict_file

        dest, n = predict_file(run_dir, file, out)
    except SecfedError as e:
        _fail(e)
        return
    typer.echo(f"{n} rows labelled: {dest}")


def _add_deploy() -> None:
    try:
        from secfed.flower.cli import deploy_app
    except ImportError:  # typer is all it needs; keep the main CLI working regardless
        return
    app.add_typer(deploy_app, name="deploy")


_add_deploy()


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted; continue with --resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
