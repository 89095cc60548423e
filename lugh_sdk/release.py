"""`lugh build` and `lugh publish`: the vendor's side of a release.

Publishing builds the wheel if the sources changed since the last build, runs every
check of `lugh check` on that very wheel, and only then hands it to the registry
(:func:`registry.publish.publish`), which signs it with the vendor's key and adds it to
the vendor's TUF role. The registry refuses what it must (a version already published,
a package outside the vendor's names, a key that is not the vendor's); the error comes
back as one line and nothing is published.

Which registry and key:

- no ``registry``: this machine's own registry (``LUGH_HOME/registry``, created on
  first use). The vendor is added to it on first publish, delegated the package's name,
  with the key ``key`` (default: the vendor's name) from this machine's key store,
  created if missing.
- ``registry`` DIR: a registry the operator runs, where the vendor has been added with
  the public key of ``key`` (`lugh registry add-vendor V --key PUB --packages ...`).
  The private key must be in this machine's key store (`lugh keys new NAME`).
"""

from __future__ import annotations

from pathlib import Path

from kernel.plugin_store import PluginError
from lugh_sdk import project as projects
from lugh_sdk.check import Report, check_project
from lugh_sdk.errors import LughError


class ChecksFailed(LughError):
    """Not published: the report says which checks failed."""

    def __init__(self, report: Report):
        self.report = report
        names = ", ".join(i.name for i in report.failed)
        super().__init__(f"not published: {len(report.failed)} check(s) failed ({names}); run `lugh check` for details")


def build(path: Path | str = ".") -> Path:
    """Build the project's wheel into its dist/ (poetry-core); returns the wheel."""
    return projects.build(projects.read_project(path))


def ensure_built(project: projects.Project) -> tuple[Path, bool]:
    """The wheel built from the current sources, building it if needed; (wheel, built now)."""
    wheel = projects.current_wheel(project)
    if wheel is not None:
        return wheel, False
    return projects.build(project), True


def _registry_and_key(home: Path, registry: Path | None, key: str, vendor: str, name: str) -> tuple[Path, Path]:
    if registry is None:
        from registry import local

        local.ensure(home)
        return local.registry_dir(home), local.ensure_vendor(home, vendor, [name], key)
    from registry.keys import keystore

    store = keystore(home)
    if not store.exists(key):
        raise LughError(f"no key named {key!r} on this machine: create it with `lugh keys new {key}` and have the "
                        f"registry's operator add vendor {vendor!r} with its public key (`lugh keys export {key}`)")
    return Path(registry), store.private_path(key)


def publish(path: Path | str = ".", *, home: Path, registry: Path | str | None = None, key: str | None = None,
            vendor: str | None = None, on_step=lambda step: None) -> dict:
    """Build if needed, check, sign and publish the project at ``path``. Returns what
    the registry published, with ``wheel``, ``built`` and ``registry``. Raises
    :class:`ChecksFailed` or LughError (nothing published)."""
    project = projects.read_project(path)
    vendor = vendor or project.vendor
    if not vendor:
        raise LughError("no vendor: pass --vendor, or set it in pyproject.toml under [tool.lugh] vendor = \"...\"")
    on_step("build")
    wheel, built = ensure_built(project)
    on_step("check")
    report = check_project(project.path, wheel=wheel)
    if not report.ok:
        raise ChecksFailed(report)
    on_step("publish")
    try:
        from registry.publish import publish as registry_publish

        registry_dir, key_path = _registry_and_key(home, Path(registry) if registry else None, key or vendor, vendor,
                                                   report.manifest.name)
        result = registry_publish(registry_dir, wheel, vendor, key_path, home=home)
    except PluginError as exc:  # registry.errors.RegistryError is one
        raise LughError(f"not published: {exc}") from None
    return {**result, "wheel": str(wheel), "built": built, "registry": str(registry_dir)}
