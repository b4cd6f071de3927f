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
    try:
        from secfed.config import load_config
        from secfed.engine import Engine
        from secfed.report import summary_line

        cfg = load_config(config, {**_overrides(set_), **({"deploy.transport": transport} if transport else {})})
        if cfg.deploy.transport != "inprocess":
            from secfed.flower.transport import run_flower

            summary = run_flower(cfg, out, resume=resume)
            run_dir = Path(summary["out"])
        else:
            engine = Engine(cfg, out, resume=resume, progress=not quiet)
            summary = engine.run()
            run_dir = engine.out
    except SecfedError as e:
        _fail(e)
        return
    typer.echo(summary_line(summary))
    typer.echo(f"report: {run_dir / 'report.md'}")


@app.command()
def compare(grid: Path = typer.Argument(..., help="grid TOML, e.g. experiments/tradeoffs_digits.toml"),
            out: Optional[Path] = typer.Option(None, "--out", help="output folder (default: runs/compare/<grid name>)"),
            retries: int = typer.Option(1, "--retries", help="times a crashed cell is retried"),
            report_only: bool = typer.Option(False, "--report-only", help="rewrite the report from finished cells"),
            quiet: bool = typer.Option(False, "--quiet", help="no progress bars")) -> None:
    """Compare: run every cell of GRID (resumable; done cells are skipped) and write report.md with plots."""
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
                                      "or observer names (dlg, text-inversion, dp-audit) replayed on the run's protocol"),
          out: Optional[Path] = typer.Option(None, "--out", help="audit folder (default: RUN_DIR/audit)"),
          quiet: bool = typer.Option(False, "--quiet", help="no progress bar")) -> None:
    """Audit: run ATTACKS against what a run's server saw and its final model; write audit.md."""
    try:
        from secfed.compare.audit import audit_run

        run_dir = target
        if target.is_file():
            from secfed.config import load_config
            from secfed.engine import Engine

            cfg = load_config(target)
            engine = Engine(cfg, None, progress=not quiet)
            engine.run()
            run_dir = engine.out
        names = [a.strip() for a in attacks.split(",") if a.strip()]
        report = audit_run(run_dir, names, out, progress=not quiet)
    except SecfedError as e:
        _fail(e)
        return
    bad = [v for v in report["verdicts"] if v["verdict"] == "contradicts"]
    dest = out or run_dir / "audit"
    typer.echo(f"audit: {dest / 'audit.md'}" + (f" ({len(bad)} figure(s) contradict the claimed epsilon)" if bad else ""))


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
