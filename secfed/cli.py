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
        quiet: bool = typer.Option(False, "--quiet", help="no progress bar")) -> None:
    """Train: run the federated experiment CONFIG and write rounds.jsonl, summary.json and report.md."""
    try:
        from secfed.config import load_config
        from secfed.engine import Engine
        from secfed.report import summary_line

        cfg = load_config(config, _overrides(set_))
        engine = Engine(cfg, out, resume=resume, progress=not quiet)
        summary = engine.run()
    except SecfedError as e:
        _fail(e)
        return
    typer.echo(summary_line(summary))
    typer.echo(f"report: {engine.out / 'report.md'}")


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
