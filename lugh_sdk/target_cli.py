"""`lugh target`: add, list and remove targets; make the certificates of one.
Imports are lazy (``lugh --help`` stays fast)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

target_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Targets: QEMU virtual machines and boards over mutual TLS.")
HomeOpt = typer.Option(None, "--home", envvar="LUGH_HOME", help="State directory (default: ~/.local/share/lugh).")


def _home(home: Optional[Path]) -> Path:
    from lugh_sdk.home import lugh_home

    return lugh_home(home)


@target_app.command("certs")
def certs(
    name: str,
    out: Optional[Path] = typer.Option(None, "--out", help="Directory (default: LUGH_HOME/targets/NAME)."),
    host: list[str] = typer.Option(["127.0.0.1", "localhost"], "--host", help="Names/addresses of the target (server certificate)."),
    days: int = typer.Option(825, "--days", help="Validity of the server and client certificates."),
    home: Optional[Path] = HomeOpt,
):
    """Make a CA and the server and client certificates (ECDSA P-256) for a target."""
    from lugh_sdk import targets, tls

    d = out or targets.certs_dir(_home(home), name)
    tls.make_target_certs(d, name, hosts=tuple(host), days=days)
    typer.echo(f"Wrote {d}/: ca.pem ca.key server.pem server.key client.pem client.key (keys 0600).")
    typer.echo("On the target: python -m kernel --home DIR --listen tls+tcp://0.0.0.0:PORT --tls-dir DIR "
               "(with ca.pem, server.pem, server.key)")
    typer.echo(f"Here: lugh target add {name} --address tls+tcp://HOST:PORT --ca {d}/ca.pem "
               f"--cert {d}/client.pem --key {d}/client.key")


@target_app.command("add")
def add(
    name: str,
    qemu: Optional[str] = typer.Option(None, "--qemu", help="A QEMU virtual machine: x86_64 or aarch64."),
    address: Optional[str] = typer.Option(None, "--address", help="tls+tcp://HOST:PORT of a remote kernel."),
    ca: Optional[Path] = typer.Option(None, "--ca", help="The CA that signed the target's certificate."),
    cert: Optional[Path] = typer.Option(None, "--cert", help="Our client certificate."),
    key: Optional[Path] = typer.Option(None, "--key", help="Our client key."),
    port: Optional[int] = typer.Option(None, "--port", help="QEMU: the host port forwarded to the guest (default: a free one)."),
    home: Optional[Path] = HomeOpt,
):
    """Add a target: --qemu ARCH, or --address with --ca, --cert and --key."""
    from lugh_sdk import targets
    from lugh_sdk.errors import LughError

    if (qemu is None) == (address is None):
        raise LughError("give either --qemu ARCH or --address tls+tcp://HOST:PORT")
    if qemu is not None:
        entry = targets.add_qemu(_home(home), name, qemu, port=port)
        typer.echo(f"Added QEMU target {name} ({qemu}), control at {entry['address']}; boot it with "
                   f"`lugh up --target {name}`.")
        return
    if None in (ca, cert, key):
        raise LughError("a remote target needs --ca, --cert and --key")
    targets.add_remote(_home(home), name, address, ca, cert, key)
    typer.echo(f"Added target {name} at {address}.")


@target_app.command("list")
def list_(home: Optional[Path] = HomeOpt, as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """The targets, and whether each QEMU target's VM is running."""
    from lugh_sdk import qemu, targets

    h = _home(home)
    data = targets.load(h)
    for name, entry in data.items():
        if entry["kind"] == "qemu":
            entry["running"] = qemu.running(h, name)
    if as_json:
        typer.echo(json.dumps({"local": {"kind": "local", "home": str(h)}, **data}, indent=2))
        return
    typer.echo(f"{'local':<16} local    {h}")
    for name, entry in sorted(data.items()):
        what = f"qemu {entry['arch']}" if entry["kind"] == "qemu" else "remote"
        extra = (" (running)" if entry.get("running") else "") if entry["kind"] == "qemu" else ""
        typer.echo(f"{name:<16} {what:<8} {entry['address']}{extra}")


@target_app.command("rm")
def rm(name: str, home: Optional[Path] = HomeOpt):
    """Forget a target (a running QEMU target must be stopped first)."""
    from lugh_sdk import targets

    targets.remove(_home(home), name)
    typer.echo(f"Removed target {name}.")
