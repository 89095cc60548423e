"""The vendor's commands: `lugh new`, `lugh check`, `lugh build`, `lugh publish`.

Registered onto the main app by :mod:`lugh_sdk.cli` (``register(app)``). Thin, like
the rest of the CLI: each command calls :mod:`lugh_sdk.scaffold`, :mod:`lugh_sdk.check`
or :mod:`lugh_sdk.release`, and prints; imports are lazy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

KINDS_HELP = "scheduler, storage or monitor"


def print_report(report) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    marks = {"passed": ("✓", "green"), "failed": ("✗", "red"), "skipped": ("-", "dim")}
    title = f"lugh check {report.project}" + (f" ({report.wheel})" if report.wheel else "")
    table = Table(title=title, title_justify="left", show_lines=False)
    for col in ("", "check", "detail"):
        table.add_column(col)
    for item in report.items:
        mark, style = marks[item.status]
        table.add_row(Text(mark, style=style), item.name, Text(item.detail, style=style if item.status != "passed" else ""))
    console = Console()
    console.print(table)
    counts = {s: sum(1 for i in report.items if i.status == s) for s in marks}
    verdict = "[green]ready to publish[/]" if report.ok else "[red]not ready to publish[/]"
    console.print(f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped: {verdict}")


def register(app: typer.Typer) -> None:
    from lugh_sdk.cli import HomeOpt, JsonOpt, _home, _print_json

    @app.command("new")
    def new(
        kind: str = typer.Argument(..., help=f"The plugin kind: {KINDS_HELP}."),
        name: str = typer.Argument(..., help="The plugin's name: lowercase letters, digits and '-' (e.g. my-sched)."),
        vendor: Optional[str] = typer.Option(None, "--vendor", help="Your vendor name in the registry "
                                             "(default: $LUGH_VENDOR, else your login name)."),
        directory: Optional[Path] = typer.Option(None, "--dir", help="The project directory to create "
                                                 "(default: ./NAME); it must not exist."),
    ):
        """Create a plugin project from the templates: it builds and its tests pass as it is."""
        from lugh_sdk import scaffold

        path = scaffold.new_project(kind, name, vendor=vendor, directory=directory)
        typer.echo(f"Created {kind} plugin {name} in {path}.\n"
                   f"  cd {path}\n  python -m pytest -q     # its tests, with the SDK's harness\n"
                   f"  lugh check              # compatibility and conformance\n"
                   f"  lugh publish            # build, check, sign, publish")

    @app.command("check")
    def check(
        directory: Path = typer.Argument(Path("."), help="The plugin project (default: here)."),
        conformance: bool = typer.Option(True, "--conformance/--no-conformance",
                                         help="Run the conformance suite of the plugin's kind."),
        as_json: bool = JsonOpt,
    ):
        """Check a plugin project as a target would, then run its kind's conformance suite."""
        from lugh_sdk.check import check_project

        report = check_project(directory, conformance=conformance)
        _print_json(report.to_dict()) if as_json else print_report(report)
        if not report.ok:
            raise typer.Exit(1)

    @app.command("build")
    def build(
        directory: Path = typer.Argument(Path("."), help="The plugin project (default: here)."),
        as_json: bool = JsonOpt,
    ):
        """Build the plugin's wheel with poetry-core into DIR/dist."""
        from lugh_sdk import release

        wheel = release.build(directory)
        _print_json({"wheel": str(wheel)}) if as_json else typer.echo(f"Built {wheel}")

    @app.command("publish")
    def publish(
        directory: Path = typer.Argument(Path("."), help="The plugin project (default: here)."),
        registry: Optional[Path] = typer.Option(None, "--registry", help="The registry directory "
                                                "(default: this machine's registry, LUGH_HOME/registry)."),
        key: Optional[str] = typer.Option(None, "--key", help="The signing key's name in this machine's key store "
                                          "(default: the vendor's name)."),
        vendor: Optional[str] = typer.Option(None, "--vendor", help="Publish as this vendor "
                                             "(default: [tool.lugh] vendor in pyproject.toml)."),
        home: Optional[Path] = HomeOpt,
        as_json: bool = JsonOpt,
    ):
        """Build if needed, check, sign and add the release to the registry (a published version is never replaced)."""
        from rich.console import Console

        from lugh_sdk import release

        console = Console(stderr=True)
        steps = {"build": "Building the wheel (if the sources changed)...", "check": "Checking the wheel...",
                 "publish": "Signing and publishing..."}
        try:
            with console.status("Starting...") as status:
                result = release.publish(directory, home=_home(home), registry=registry, key=key, vendor=vendor,
                                         on_step=lambda step: status.update(steps[step]))
        except release.ChecksFailed as exc:
            if as_json:
                _print_json(exc.report.to_dict())
            else:
                print_report(exc.report)
            raise
        if as_json:
            _print_json(result)
        else:
            typer.echo(f"Published {result['name']} {result['version']} ({result['kind']}) as vendor "
                       f"{result['vendor']} to {result['registry']}\n  {result['target']}  sha256 {result['sha256']}"
                       + ("" if result["built"] else "\n  (the wheel in dist/ was up to date: not rebuilt)"))
