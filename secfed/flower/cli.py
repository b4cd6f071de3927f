"""``secfed deploy ...``: certificates, node keys, partitions, the Flower App, and a local federation.

Registered on the main CLI as the ``deploy`` group (``secfed/cli.py``). The
exact commands for a federation across machines are in ``docs/deploy.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from secfed.errors import SecfedError

deploy_app = typer.Typer(add_completion=False, no_args_is_help=True,
                         help="Run across machines: a Flower SuperLink and SuperNodes with TLS.")


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)


@deploy_app.command()
def certs(out: Path = typer.Argument(..., help="folder for ca.crt, server.pem, server.key"),
          name: list[str] = typer.Option([], "--name", help="extra DNS name or IP of the SuperLink (repeatable)"),
          force: bool = typer.Option(False, "--force", help="replace existing files (atomically, never through a symlink)")) -> None:
    """Make a CA and a SuperLink server certificate (localhost, 127.0.0.1, ::1 and every --name)."""
    from secfed.flower.deploy import make_certs

    try:
        paths = make_certs(out, tuple(name) or ("localhost",), force=force)
    except SecfedError as e:
        _fail(e)
        return
    for k in ("ca", "cert", "key"):
        typer.echo(f"{k}: {paths[k]}")
    typer.echo(f"CA private key: {paths['ca_key']} -- move it OFFLINE now (it signs certificates the SuperNodes "
               f"trust; the SuperLink does not need it); give every SuperNode {paths['ca']}")


@deploy_app.command("node-key")
def node_key(out: Path = typer.Argument(..., help="folder for NAME.key and NAME.pub"),
             name: str = typer.Argument("node", help="file name stem"),
             force: bool = typer.Option(False, "--force", help="replace existing files (atomically, never through a symlink)")) -> None:
    """Make a SuperNode authentication key pair (register NAME.pub with `flwr supernode register`)."""
    from secfed.flower.deploy import make_node_key

    try:
        priv, pub = make_node_key(out, name, force=force)
    except SecfedError as e:
        _fail(e)
        return
    typer.echo(f"private: {priv}\npublic:  {pub}")


@deploy_app.command()
def split(config: Path = typer.Argument(..., help="experiment TOML"),
          out: Path = typer.Argument(..., help="folder for partition-<i>.safetensors"),
          set_: list[str] = typer.Option([], "--set", help="override a key, e.g. --set data.num_clients=3")) -> None:
    """Write one data partition file per client (each SuperNode gets only its own)."""
    try:
        from secfed.cli import _overrides
        from secfed.config import load_config
        from secfed.flower.deploy import write_partitions

        paths = write_partitions(load_config(config, _overrides(set_)), out)
    except SecfedError as e:
        _fail(e)
        return
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
          set_: list[str] = typer.Option([], "--set", help="override a key, e.g. --set run.rounds=3")) -> None:
    """Start a SuperLink and one SuperNode per client on this machine (TLS, node auth), run CONFIG, stop them."""
    try:
        from secfed.cli import _overrides
        from secfed.config import load_config
        from secfed.flower.transport import run_flower

        cfg = load_config(config, {**_overrides(set_), "deploy.transport": "flower"})
        summary = run_flower(cfg, out, resume=resume, work_dir=work)
    except SecfedError as e:
        _fail(e)
        return
    from secfed.report import summary_line

    typer.echo(summary_line(summary))
    typer.echo(f"report: {Path(summary['out']) / 'report.md'}")
