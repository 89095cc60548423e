"""The target's side of a registry: refresh and verify its metadata with python-tuf's
``Updater`` from the target's own trust anchor (:mod:`registry.trust`), find
releases, and download one, verified against its signed length and hash.

Every refusal is a :class:`RegistryError` saying what was found and why it is refused
(python-tuf's own message is kept in it). Nothing here touches installed plugins:
:mod:`kernel.install` decides what to do with a verified release.

Listing all releases needs every vendor role, verified: ngclient's public API only
looks targets up by path, so :class:`Session` loads delegated roles through
``Updater._load_targets`` (the same verified path ``get_targetinfo`` takes) and reads
the trusted snapshot; the release finally installed is looked up again through the
public ``get_targetinfo`` walk, which applies the delegation rules itself.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tuf.api import exceptions

from kernel import plugin_store
from registry import artifact
from registry.errors import RegistryError
from registry.fetch import Fetcher
from registry.repo import REVOKED, patterns_of
from registry.trust import Trusted

WHEEL_FILE_RE = re.compile(r"^[A-Za-z0-9_.+-]+\.whl$")


@dataclass(frozen=True)
class Release:
    name: str
    version: str
    vendor: str
    path: str
    length: int
    sha256: str
    custom: dict
    target: object  # tuf TargetFile

    @property
    def manifest(self) -> plugin_store.Manifest:
        return artifact.manifest_from_signed(self.custom, self.path)

    @property
    def filename(self) -> str:
        return self.path.split("/", 1)[1]

    def describe(self) -> dict:
        m = self.custom.get("lugh", {})
        return {"name": self.name, "version": self.version, "vendor": self.vendor, "kind": m.get("kind"),
                "api": m.get("api"), "architectures": m.get("architectures"), "python": m.get("python"),
                "kernel": m.get("kernel", ""), "description": m.get("description", ""),
                "length": self.length, "sha256": self.sha256, "target": self.path}


def explain(exc: Exception, registry: str) -> RegistryError:
    """A python-tuf failure as a refusal that says what kind of attack or fault it is."""
    msg = str(exc) or type(exc).__name__
    if isinstance(exc, exceptions.ExpiredMetadataError):
        why = "the registry's metadata has expired (a stale or frozen registry)"
    elif isinstance(exc, exceptions.BadVersionNumberError):
        if "must be >=" in msg or "rollback" in msg.lower():
            why = "metadata older than what this target has already verified (a rollback)"
        else:
            why = "metadata versions that do not match the snapshot (mixed-and-matched metadata)"
    elif isinstance(exc, exceptions.UnsignedMetadataError):
        why = "a signature check failed (signed by an unknown or untrusted key)"
    elif isinstance(exc, exceptions.LengthOrHashMismatchError):
        why = "a file does not match its signed length or hash (tampered, or mixed-and-matched metadata)"
    elif isinstance(exc, exceptions.DownloadLengthMismatchError):
        why = "a file is longer than its signed length (tampered)"
    elif isinstance(exc, exceptions.DownloadHTTPError):
        why = f"a file the signed metadata names is missing (HTTP {exc.status_code})"
    elif isinstance(exc, exceptions.DownloadError):
        why = "the registry could not be reached"
    else:
        why = "its metadata failed verification"
    return RegistryError(f"registry {registry}: {why}: {msg}; refused")


class Session:
    """One verified view of a registry. ``metadata_dir`` defaults to the target's
    own cache; pass a scratch copy to look without advancing it (``lugh search``)."""

    def __init__(self, trusted: Trusted, metadata_dir: Path | None = None):
        from tuf.ngclient import Updater, UpdaterConfig

        self.trusted = trusted
        self.fetcher = Fetcher(trusted.url)
        md_dir = Path(metadata_dir or trusted.metadata_dir)
        md_dir.mkdir(parents=True, exist_ok=True)
        cached = md_dir / "root.json"
        bootstrap = None if cached.exists() else trusted.anchor.read_bytes()
        try:
            self.updater = Updater(str(md_dir), trusted.url + "metadata/", None, trusted.url + "targets/",
                                   self.fetcher, UpdaterConfig(), bootstrap=bootstrap)
        except (exceptions.RepositoryError, OSError) as exc:
            raise explain(exc, trusted.name) from None
        self._refreshed = False

    def close(self) -> None:
        self.fetcher.close()

    # ------------------------------------------------------------------ metadata

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except (exceptions.RepositoryError, exceptions.DownloadError) as exc:
            raise explain(exc, self.trusted.name) from None

    def refresh(self) -> None:
        if not self._refreshed:
            self._guard(self.updater.refresh)
            self._refreshed = True

    def top(self):
        self.refresh()
        return self.updater._trusted_set.targets

    def vendors(self) -> dict:
        delegations = self.top().delegations
        return dict(delegations.roles) if delegations and delegations.roles else {}

    def revoked(self) -> dict:
        return dict(self.top().unrecognized_fields.get(REVOKED, {}))

    def role(self, vendor: str):
        """The vendor's verified role (None if it has published nothing yet)."""
        self.refresh()
        if f"{vendor}.json" not in self.updater._trusted_set.snapshot.meta:
            return None
        return self._guard(self.updater._load_targets, vendor, "targets")

    def _releases_in(self, vendor: str, delegation, role) -> list[Release]:
        out = []
        for path, target in (role.targets if role else {}).items():
            name, _, filename = path.partition("/")
            lugh = (target.custom or {}).get("lugh") or {}
            if (not WHEEL_FILE_RE.match(filename) or lugh.get("name") != name or not isinstance(lugh.get("version"), str)
                    or not delegation.is_delegated_path(path)):
                continue
            out.append(Release(name=name, version=lugh["version"], vendor=vendor, path=path, length=target.length,
                               sha256=target.hashes.get("sha256", ""), custom=target.custom, target=target))
        return out

    def releases(self) -> tuple[list[Release], dict[str, str]]:
        """Every release whose vendor role verifies, and the vendors whose role did
        not (vendor -> reason)."""
        found, errors = [], {}
        for vendor, delegation in self.vendors().items():
            try:
                found += self._releases_in(vendor, delegation, self.role(vendor))
            except RegistryError as exc:
                errors[vendor] = str(exc)
        return found, errors

    # ------------------------------------------------------------------ one release

    def resolve(self, name: str, version: str | None = None) -> Release:
        """The release to install: from the vendor delegated for ``name`` (the first
        delegation that matches, as TUF's walk decides), the given or newest version."""
        vendors = self.vendors()
        probe = f"{name}/{name}.whl"
        owner = next((v for v, d in vendors.items() if d.is_delegated_path(probe)), None)
        if owner is None:
            self._refuse_unknown(name, version, vendors)
        releases = [r for r in self._releases_in(owner, vendors[owner], self.role(owner)) if r.name == name]
        if version is not None:
            releases = [r for r in releases if r.version == version]
        if not releases:
            self._refuse_unknown(name, version, vendors, owner=owner)
        release = max(releases, key=lambda r: plugin_store.parse_version(r.version))
        target = self._guard(self.updater.get_targetinfo, release.path)
        if target is None or target != release.target:
            raise RegistryError(f"registry {self.trusted.name}: {release.path} is not what the delegation walk "
                                f"finds; refused")
        return release

    def _refuse_unknown(self, name: str, version: str | None, vendors: dict, owner: str | None = None):
        what = f"{name} {version}" if version else name
        for vendor, record in self.revoked().items():
            if vendor not in vendors and any(fnmatch.fnmatchcase(name, p) for p in record.get("packages", [])):
                raise RegistryError(f"registry {self.trusted.name}: vendor {vendor!r}, which published {name}, was "
                                    f"revoked on {record.get('at', '?')}; its releases are no longer trusted; refused")
        for vendor, delegation in vendors.items():
            if vendor == owner:
                continue
            try:
                role = self.role(vendor)
            except RegistryError:
                continue
            for path, target in (role.targets if role else {}).items():
                lugh = (target.custom or {}).get("lugh") or {}
                if path.split("/", 1)[0] == name or lugh.get("name") == name:
                    if version is None or lugh.get("version") == version:
                        raise RegistryError(
                            f"registry {self.trusted.name}: vendor {vendor!r} signed {what}, which is outside the "
                            f"names delegated to it ({', '.join(patterns_of(delegation))}); refused")
        if owner is not None:
            available = sorted({r.version for r in self._releases_in(owner, vendors[owner], self.role(owner))
                                if r.name == name}, key=plugin_store.parse_version)
            if available:
                raise RegistryError(f"registry {self.trusted.name} has no version {version} of {name} "
                                    f"(available: {', '.join(available)})")
        raise RegistryError(f"registry {self.trusted.name} has no package named {name!r}")

    def download(self, release: Release, dest_dir: Path, on_bytes=None, max_bytes: int | None = None) -> Path:
        """Fetch the release into ``dest_dir``, checked against its signed length and
        sha256 as it arrives; refused before any byte is fetched when its signed length
        is over the size limit."""
        limit = plugin_store.MAX_WHEEL_BYTES if max_bytes is None else max_bytes
        if release.length > limit:
            raise RegistryError(f"{release.name} {release.version} is {release.length} bytes, over the size limit "
                                f"of {limit} bytes; refused")
        if not WHEEL_FILE_RE.match(release.filename):
            raise RegistryError(f"{release.path}: not a wheel file name; refused")
        self.fetcher.on_bytes = on_bytes
        try:
            return Path(self._guard(self.updater.download_target, release.target, str(Path(dest_dir) / release.filename)))
        finally:
            self.fetcher.on_bytes = None


@contextmanager
def scratch_session(trusted: Trusted):
    """A session over a throw-away copy of the target's verified metadata: it starts
    from all the target has seen (so it cannot be rolled back either) and changes
    nothing. For read-only commands (search, info)."""
    with tempfile.TemporaryDirectory(prefix="lugh-tuf-") as tmp:
        md = Path(tmp) / "metadata"
        if trusted.metadata_dir.is_dir():
            shutil.copytree(trusted.metadata_dir, md, symlinks=True)
        session = Session(trusted, md)
        try:
            yield session
        finally:
            session.close()
