"""``secfed deploy ...``: certificates, node keys, partitions, the Flower App, and a local federation.

Registered on the main CLI as the ``deploy`` group (``secfed/cli.py``). The
exact commands for a federation across machines are in ``docs/deploy.md``.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer

from secfed.errors import SecfedError

deploy_app = typer.Typer(add_completion=False, no_args_is_help=True,
                         help="Run across machines: a Flower SuperLink and SuperNodes with TLS.")
FORCE = typer.Option(False, "--force", help="replace existing files (atomically, never through a symlink)")
SET = typer.Option([], "--set", help="override a key, e.g. --set data.num_clients=3")


@contextmanager
def _one_line() -> Iterator[None]:
    """A user's mistake (secfed.errors) ends the command with one line and exit code 2."""
    try:
        yield
    except SecfedError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


@deploy_app.command()
def certs(out: Path = typer.Argument(..., help="folder for ca.crt, server.pem, server.key"),
          name: list[str] = typer.Option([], "--name", help="extra DNS name or IP of the SuperLink (repeatable)"),
          force: bool = FORCE) -> None:
    """Make a CA and a SuperLink server certificate (localhost, 127.0.0.1, ::1 and every --name)."""
    from secfed.keys import make_certs

    with _one_line():
        paths = make_certs(out, tuple(name) or ("localhost",), force=force)
    for k in ("ca", "cert", "key"):
        typer.echo(f"{k}: {paths[k]}")
    typer.echo(f"CA private key: {paths['ca_key']} -- move it OFFLINE now (it signs certificates the SuperNodes "
               f"trust; the SuperLink does not need it); give every SuperNode {paths['ca']}")


@deploy_app.command("node-key")
def node_key(out: Path = typer.Argument(..., help="folder for NAME.key and NAME.pub"),
             name: str = typer.Argument("node", help="file name stem"), force: bool = FORCE) -> None:
    """Make a SuperNode authentication key pair (register NAME.pub with `flwr supernode register`)."""
    from secfed.keys import make_node_key

    with _one_line():
        priv, pub = make_node_key(out, name, force=force)
    typer.echo(f"private: {priv}\npublic:  {pub}")


@deploy_app.command()
def split(config: Path = typer.Argument(..., help="experiment TOML"),
          out: Path = typer.Argument(..., help="folder for partition-<i>.safetensors"), set_: list[str] = SET) -> None:
    """Write one data partition file per client (each SuperNode gets only its own)."""
    from secfed.cli import _overrides
    from secfed.config import load_config
    from secfed.partitions import write_partitions

    with _one_line():
        paths = write_partitions(load_config(config, _overrides(set_)), out)
    typer.echo(f"{len(paths)} partitions in {out}")


@deploy_app.command()
def app(out: Path = typer.Argument(..., help="folder for the Flower App (pyproject.toml) that `flwr run` submits")) -> None:
    """Write the Flower App folder naming secfed's ServerApp and ClientApp."""
    from secfed.flower.deploy import write_app

    typer.echo(str(write_app(out)))


@deploy_app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                      "help_option_names": []})
def supernode(ctx: typer.Context) -> None:
    """flower-supernode's arguments: a SuperNode whose ClientApp process stays alive across messages.

    Runs `flower-supernode ARGS --isolation process` plus one secfed ClientApp worker
    (secfed.flower.worker): no process start-up per message, short idle polling.
    """
    from secfed.flower.worker import supernode_main

    supernode_main(list(ctx.args))


@deploy_app.command()
def local(config: Path = typer.Argument(..., help="experiment TOML"),
          out: Optional[Path] = typer.Option(None, "--out", help="run directory (default: runs/<run.name>)"),
          work: Optional[Path] = typer.Option(None, "--work", help="certificates, keys, partitions, logs "
                                              "(default: <out>.deploy)"),
          resume: bool = typer.Option(False, "--resume", help="continue from the checkpoint and privacy ledger"),
          set_: list[str] = SET) -> None:
    """Start a SuperLink and one SuperNode per client on this machine (TLS, node auth), run CONFIG, stop them."""
    from secfed.cli import _overrides
    from secfed.config import load_config
    from secfed.flower.deploy import run_flower
    from secfed.report import summary_line

    with _one_line():
        cfg = load_config(config, {**_overrides(set_), "deploy.transport": "flower"})
        summary = run_flower(cfg, out, resume=resume, work_dir=work)
    typer.echo(summary_line(summary))
    typer.echo(f"report: {Path(summary['out']) / 'report.md'}")
