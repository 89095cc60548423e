"""The registry's commands: `lugh keys ...`, `lugh registry ...`, `lugh search`,
`lugh info`, and the target's `lugh install`, `lugh list`, `lugh uninstall`,
`lugh rollback`.

Registered onto the main app by :mod:`lugh_sdk.cli` (``register(app)``). Thin: each
command calls :mod:`registry` (publisher and reader side, on this machine) or sends a
request to the target's kernel, which verifies and installs for itself
(:mod:`kernel.install`). Imports are lazy.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Optional

import typer

keys_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Ed25519 signing keys, kept in LUGH_HOME/keys (private keys 0600).")
registry_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Registries: create and run one; trust one on this machine.")

RegistryDirOpt = typer.Option(None, "--registry", help="The registry directory (default: this machine's own, "
                                                       "LUGH_HOME/registry).")
RegistryOpt = typer.Option("local", "--registry", help="A registry this machine trusts: its name (see "
                                                       "`lugh registry list`), directory or URL.")


def _when(ts) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if ts else "-"


def _repo(home: Path, directory: Optional[Path]):
    from registry import local
    from registry.keys import keystore
    from registry.repo import Repository

    if directory is None:
        return local.ensure(home)
    return Repository.open(directory, keystore(home))


def _reader(home: Path, registry: str):
    """A scratch, verified session on a trusted registry (the local one is created on
    first use)."""
    from registry import client, local, trust

    if registry == trust.LOCAL:
        local.ensure(home)
    return client.scratch_session(trust.get(home, registry))


def _prepare_local(home: Path, registry: str, target: str) -> None:
    """Re-sign the machine's own registry's timestamp if it is about to expire (this
    machine is its operator), so that the target does not refuse it as stale."""
    from registry import local, trust

    if target == "local" and registry == trust.LOCAL and local.needs_refresh(home):
        local.ensure(home)


def register(app: typer.Typer) -> None:
    from lugh_sdk.cli import HomeOpt, JsonOpt, TargetOpt, _client, _home, _print_json

    app.add_typer(keys_app, name="keys")
    app.add_typer(registry_app, name="registry")

    # ------------------------------------------------------------------ keys

    @keys_app.command("new")
    def keys_new(name: str = typer.Argument(..., help="The key's name, e.g. your vendor name."),
                 home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt):
        """Create an Ed25519 key pair (the private key is written 0600 and never shown)."""
        from registry.keys import keystore

        info = keystore(_home(home)).new(name)
        data = {"name": info.name, "keyid": info.keyid, "public_key": str(info.public_path)}
        _print_json(data) if as_json else typer.echo(
            f"Created key {info.name} (key id {info.keyid[:16]}...).\n"
            f"  public key: {info.public_path}  (share it: `lugh keys export {info.name}`)")

    @keys_app.command("list")
    def keys_list(home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt):
        """The keys on this machine."""
        from rich.console import Console
        from rich.table import Table

        from registry.keys import keystore

        keys = keystore(_home(home)).list()
        if as_json:
            return _print_json([{"name": k.name, "keyid": k.keyid, "private": k.private, "created": k.created}
                                for k in keys])
        t = Table(title="Keys", title_justify="left")
        for col in ("name", "key id", "private key here", "created"):
            t.add_column(col)
        for k in keys:
            t.add_row(k.name, k.keyid[:16], "yes" if k.private else "no", _when(k.created))
        Console().print(t)

    @keys_app.command("export")
    def keys_export(name: str, home: Optional[Path] = HomeOpt):
        """Print a key's PUBLIC key (PEM), to give to a registry's operator."""
        from registry.keys import keystore

        typer.echo(keystore(_home(home)).public_pem(name), nl=False)

    # ------------------------------------------------------------------ registry (operator)

    @registry_app.command("init")
    def registry_init(directory: Path = typer.Argument(..., help="The new registry's directory (absent or empty)."),
                      key_prefix: Optional[str] = typer.Option(None, "--key-prefix", help="Name the role keys "
                                                               "PREFIX-root, PREFIX-targets... (default: the "
                                                               "directory's name)."),
                      trust_as: Optional[str] = typer.Option(None, "--trust", help="Also trust it on this machine "
                                                             "under this name."),
                      home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt):
        """Create a registry: TUF root, targets, snapshot and timestamp, with new keys."""
        import re

        from registry import trust
        from registry.keys import keystore
        from registry.repo import Repository

        h = _home(home)
        prefix = key_prefix or re.sub(r"[^a-z0-9-]+", "-", directory.resolve().name.lower()).strip("-") or "registry"
        if not prefix[0].isalpha():
            prefix = "r-" + prefix
        repo = Repository.create(directory, keystore(h), prefix)
        root = repo.meta_dir / "1.root.json"
        if trust_as:
            trust.add(h, trust_as, str(repo.path), root.read_bytes())
        data = {"registry": str(repo.path), "root": str(root), "key_prefix": prefix, "trusted_as": trust_as}
        _print_json(data) if as_json else typer.echo(
            f"Created registry {repo.path} (role keys {prefix}-root, -targets, -snapshot, -timestamp).\n"
            f"  Targets trust it with its root: lugh registry trust NAME {repo.path} --root {root}\n"
            f"  Serve it as it is with any static web server, e.g. python -m http.server -d {repo.path}")

    @registry_app.command("add-vendor")
    def registry_add_vendor(
        name: str = typer.Argument(..., help="The vendor's name (its TUF role)."),
        key: str = typer.Option(..., "--key", help="The vendor's public key: a PEM file (`lugh keys export`), or a "
                                "key name on this machine."),
        packages: list[str] = typer.Option(..., "--packages", help="Package names it may publish; patterns such as "
                                           "'acme-*'. Repeat, or separate with commas."),
        directory: Optional[Path] = RegistryDirOpt, home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt):
        """Delegate package names to a vendor's key."""
        from registry.keys import keystore, load_public

        h = _home(home)
        patterns = [p.strip() for item in packages for p in item.split(",") if p.strip()]
        data = _repo(h, directory).add_vendor(name, load_public(key, keystore(h)), patterns)
        _print_json(data) if as_json else typer.echo(
            f"Vendor {name} may now publish {', '.join(patterns)} (key id {data['keyid'][:16]}...).")

    @registry_app.command("revoke-vendor")
    def registry_revoke_vendor(name: str, directory: Optional[Path] = RegistryDirOpt,
                               home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt):
        """Revoke a vendor: its key and releases are no longer trusted by any target."""
        data = _repo(_home(home), directory).revoke_vendor(name)
        _print_json(data) if as_json else typer.echo(
            f"Revoked vendor {name}: targets no longer trust its releases of {', '.join(data['packages'])}.")

    @registry_app.command("rotate-key")
    def registry_rotate_key(role: str = typer.Argument(..., help="root, targets, snapshot, timestamp, or a vendor."),
                            key: Optional[str] = typer.Option(None, "--key", help="The new key's name on this "
                                                              "machine (default: a new key)."),
                            directory: Optional[Path] = RegistryDirOpt, home: Optional[Path] = HomeOpt,
                            as_json: bool = JsonOpt):
        """Replace a role's key and re-sign what it signs (root: signed by old and new)."""
        data = _repo(_home(home), directory).rotate_key(role, key)
        _print_json(data) if as_json else typer.echo(
            f"Rotated the {role} key: now {data['key']} (key id {data['keyid'][:16]}...).")

    @registry_app.command("refresh")
    def registry_refresh(directory: Optional[Path] = RegistryDirOpt, home: Optional[Path] = HomeOpt):
        """Re-sign the snapshot and timestamp with fresh expiry dates (run it at least weekly)."""
        repo = _repo(_home(home), directory)
        with repo.lock():
            repo.refresh()
        typer.echo(f"Re-signed the snapshot and timestamp of {repo.path}.")

    @registry_app.command("trust")
    def registry_trust(name: str = typer.Argument(..., help="A name for it on this machine."),
                       location: str = typer.Argument(..., help="Its directory or http(s) URL."),
                       root: Path = typer.Option(..., "--root", help="Its root metadata (1.root.json), obtained from "
                                                 "its operator by a channel you trust."),
                       home: Optional[Path] = HomeOpt):
        """Trust a registry on this machine (its target verifies every install against this root)."""
        from registry import trust

        entry = trust.add(_home(home), name, location, root.read_bytes())
        typer.echo(f"This machine now trusts registry {entry.name} at {entry.url}.")

    @registry_app.command("list")
    def registry_list(home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt):
        """The registries this machine trusts."""
        from registry import trust

        entries = trust.all_trusted(_home(home))
        if as_json:
            return _print_json([{"name": e.name, "url": e.url} for e in entries])
        for e in entries:
            typer.echo(f"{e.name:<16} {e.url}")
        if not entries:
            typer.echo("No registry is trusted yet (`lugh up` creates this machine's own, 'local').")

    # ------------------------------------------------------------------ search and info

    @app.command("search")
    def search(text: str = typer.Argument("", help="Words to look for in names and descriptions."),
               registry: str = RegistryOpt, home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt):
        """Find plugins in a registry (verified with this machine's trust)."""
        from rich.console import Console
        from rich.table import Table

        from kernel.plugin_store import parse_version

        with _reader(_home(home), registry) as session:
            releases, errors = session.releases()
        words = text.lower().split()
        newest: dict = {}
        for r in releases:
            hay = f"{r.name} {r.custom['lugh'].get('description', '')} {r.custom['lugh'].get('kind', '')}".lower()
            if all(w in hay for w in words):
                if r.name not in newest or parse_version(r.version) > parse_version(newest[r.name].version):
                    newest[r.name] = r
        found = [newest[n].describe() for n in sorted(newest)]
        if as_json:
            return _print_json({"results": found, "unverified_vendors": errors})
        t = Table(title=f"{len(found)} plugin(s) in registry {registry}", title_justify="left")
        for col in ("name", "version", "kind", "vendor", "description"):
            t.add_column(col)
        for r in found:
            t.add_row(r["name"], r["version"], r["kind"], r["vendor"], r["description"][:60])
        console = Console()
        console.print(t)
        for vendor, reason in errors.items():
            console.print(f"[red]vendor {vendor}: not verified, left out: {reason}[/]")

    @app.command("info")
    def info(name: str, registry: str = RegistryOpt, home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt):
        """A plugin's versions, kind, API range, architectures, vendor and signature status."""
        from kernel.plugin_store import parse_version
        from lugh_sdk.errors import LughError

        with _reader(_home(home), registry) as session:
            releases, errors = session.releases()
            vendors = session.vendors()
            revoked = session.revoked()
        mine = sorted((r for r in releases if r.name == name), key=lambda r: parse_version(r.version))
        if not mine:
            import fnmatch

            owner = next((v for v, d in vendors.items() if d.is_delegated_path(f"{name}/{name}.whl")), None)
            gone = [v for v, rec in revoked.items() if any(fnmatch.fnmatchcase(name, p) for p in rec["packages"])]
            if owner in errors:
                raise LughError(f"{name}: vendor {owner}'s releases do not verify: {errors[owner]}")
            if gone:
                raise LughError(f"{name}: its vendor {gone[0]} was revoked on {revoked[gone[0]]['at']}")
            raise LughError(f"registry {registry} has no package named {name!r}")
        rows = []
        for r in mine:
            keyids = vendors[r.vendor].keyids
            rows.append({**r.describe(), "signature": f"verified: vendor {r.vendor}, key {keyids[0][:16]}",
                         "keyids": keyids})
        if as_json:
            return _print_json({"name": name, "registry": registry, "versions": rows})
        from rich.console import Console
        from rich.table import Table

        head = rows[-1]
        t = Table(title=f"{name}: {head['kind']} plugin by {head['vendor']} — {head['description']}",
                  title_justify="left")
        for col in ("version", "kind", "plugin API", "architectures", "python", "size", "signature"):
            t.add_column(col)
        for r in rows:
            t.add_row(r["version"], r["kind"], r["api"], ", ".join(r["architectures"]), r["python"],
                      f"{r['length']} B", f"[green]{r['signature']}[/]")
        Console().print(t)

    # ------------------------------------------------------------------ on the target

    @app.command("install")
    def install(spec: str = typer.Argument(..., help="NAME or NAME==VERSION."),
                swap: bool = typer.Option(False, "--swap", help="Swap the running service of its kind to it, live; "
                                          "the install commits only if the swap does."),
                registry: str = RegistryOpt,
                health_window: int = typer.Option(300, "--health-window", help="ms the swapped-in plugin must stay "
                                                  "healthy before the swap and install commit."),
                home: Optional[Path] = HomeOpt, target: str = TargetOpt, as_json: bool = JsonOpt):
        """Verify (TUF), then install a plugin on the target transactionally; optionally swap to it live."""
        from kernel import protocol
        from kernel.plugin_store import split_spec
        from lugh_sdk import progress

        name, version = split_spec(spec)
        h = _home(home)
        _prepare_local(h, registry, target)
        req = protocol.InstallReq(name=name, version=version or "", registry=registry, swap=swap,
                                  health_window_ms=health_window)
        data = progress.request(lambda: _client(home, target), req, timeout=300)
        if as_json:
            _print_json(data)
        else:
            from lugh_sdk import views

            if data.get("swap"):
                views.print_swap(data["swap"])
            what = ("Installed" if data["installed"] else "Verified (already installed)") if data["committed"] \
                else "Rolled back the install of"
            typer.echo(f"{what} {data['name']} {data['version']} from registry {data['registry']} "
                       f"(vendor {data['vendor']}, sha256 {data['sha256'][:16]}...) in {data['duration_ms']:.0f} ms"
                       + (f": {data['reason']}" if data.get("reason") else "."))
        if not data["committed"]:
            raise typer.Exit(1)

    @app.command("list")
    def list_plugins(home: Optional[Path] = HomeOpt, target: str = TargetOpt, as_json: bool = JsonOpt):
        """The plugins installed on the target: version, kind, vendor, integrity, in use by."""
        from kernel import protocol
        from lugh_sdk.errors import NotRunning

        try:
            with _client(home, target) as client:
                plugins = client.request(protocol.PluginListReq())["plugins"]
        except NotRunning:
            if target != "local":
                raise
            from kernel import install as installer

            plugins = installer.listing(installer.OfflineTarget(_home(home)))
        if as_json:
            return _print_json({"plugins": plugins})
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"Plugins installed on {target}", title_justify="left")
        for col in ("name", "version", "kind", "vendor", "registry", "installed", "files", "in use by"):
            t.add_column(col)
        for p in plugins:
            ok = p["integrity"] == "ok"
            t.add_row(p["name"], p["version"], p["kind"], p["vendor"] or "-", p["registry"] or "-",
                      _when(p["installed_at"]), "[green]verified[/]" if ok else f"[red]{p['integrity'][:50]}[/]",
                      ", ".join(p["in_use_by"]) or "-")
        Console().print(t)

    @app.command("uninstall")
    def uninstall(spec: str = typer.Argument(..., help="NAME (every version) or NAME==VERSION."),
                  home: Optional[Path] = HomeOpt, target: str = TargetOpt):
        """Remove a plugin from the target (refused while a service uses it)."""
        from kernel import protocol
        from kernel.plugin_store import split_spec

        name, version = split_spec(spec)
        with _client(home, target) as client:
            data = client.request(protocol.UninstallReq(name=name, version=version or ""))
        typer.echo(f"Uninstalled {name} {', '.join(data['removed'])}.")

    @app.command("rollback")
    def rollback(health_window: int = typer.Option(300, "--health-window", help="ms for a swap back."),
                 home: Optional[Path] = HomeOpt, target: str = TargetOpt, as_json: bool = JsonOpt):
        """Undo the last install or swap on the target (from its journal)."""
        from kernel import protocol
        from lugh_sdk import progress

        data = progress.request(lambda: _client(home, target), protocol.RollbackReq(health_window_ms=health_window),
                                timeout=300, swap=True)
        if as_json:
            return _print_json(data)
        parts = []
        if data.get("swapped_back_to"):
            parts.append(f"swapped back to {data['swapped_back_to']}")
        if data.get("removed"):
            parts.append(f"removed {data['removed']}")
        typer.echo(f"Undid the {data['undid']} {data['undoes']}: {', '.join(parts) or 'nothing left to change'}.")
