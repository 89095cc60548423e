"""Publishing: add a wheel to a registry as a vendor's signed release.

:func:`publish` is the library entry point (``lugh publish`` calls it after building
and checking the project). It inspects the wheel (size, member names, RECORD, manifest,
entry point), refuses a package outside the vendor's delegated names and a version that
is already published (releases are immutable), copies the wheel under its hash, adds it
to the vendor's role with its signed description (the manifest and RECORD's digest as
TUF custom data), signs the role with the vendor's key, and writes a new snapshot and
timestamp.
"""

from __future__ import annotations

import os
from pathlib import Path

from registry import artifact
from registry.errors import RegistryError
from registry.keys import keystore, signer_from_file
from registry.repo import Repository, _atomic_write, _bump, patterns_of, target_path


def publish(registry_dir: Path, wheel: Path, vendor: str, key: Path, *, home: Path | None = None) -> dict:
    """Sign ``wheel`` with the vendor's private key file ``key`` and add it to the
    registry at ``registry_dir``. Returns what was published (name, version, vendor,
    target path, sha256, length, ...). ``home`` holds the key store with the registry's
    snapshot and timestamp keys (default: LUGH_HOME)."""
    return publish_many(registry_dir, [wheel], vendor, key, home=home)[0]


def publish_many(registry_dir: Path, wheels: list[Path], vendor: str, key: Path, *, home: Path | None = None,
                 skip_identical: bool = False) -> list[dict]:
    """Publish several wheels in one signed update. With ``skip_identical``, a wheel
    whose exact bytes are already published is skipped (reported as such) instead of
    refused; different bytes under a published version are always refused."""
    from tuf.api.metadata import TargetFile

    if home is None:
        from lugh_sdk.home import lugh_home

        home = lugh_home()
    repo = Repository.open(registry_dir, keystore(home))
    signer = signer_from_file(Path(key))
    wheels = [artifact.inspect(Path(w)) for w in wheels]
    results = []
    with repo.lock():
        role = repo.vendor(vendor)
        if signer.public_key.keyid not in role.keyids:
            raise RegistryError(f"{key} is not vendor {vendor!r}'s key (key id {signer.public_key.keyid[:12]}; "
                                f"the registry trusts {', '.join(k[:12] for k in role.keyids)}); nothing published")
        md = repo.vendor_metadata(vendor)
        changed = False
        for wheel in wheels:
            m = wheel.manifest
            path = target_path(m.name, wheel.filename)
            if not role.is_delegated_path(path):
                raise RegistryError(f"vendor {vendor!r} may publish only {', '.join(patterns_of(role))}; "
                                    f"{m.name} is outside its names; nothing published")
            same = [t for t in md.signed.targets.values() if _release(t) == (m.name, m.version)]
            if same:
                if skip_identical and same[0].hashes.get("sha256") == wheel.sha256:
                    results.append(_result(vendor, same[0].path, wheel, published=False))
                    continue
                raise RegistryError(f"{m.name} {m.version} is already published in {repo.path}; a published "
                                    f"version is never replaced: give the new release a new version")
            dest = repo.targets_dir / m.name / f"{wheel.sha256}.{wheel.filename}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(dest, wheel.path.read_bytes())
            os.chmod(dest, 0o644)
            md.signed.targets[path] = TargetFile(length=wheel.length, hashes={"sha256": wheel.sha256}, path=path,
                                                 unrecognized_fields={"custom": wheel.custom(vendor)})
            results.append(_result(vendor, path, wheel, published=True))
            changed = True
        if changed:
            _bump(md, "vendor")
            md.signatures.clear()
            md.sign(signer)
            repo.commit({vendor: md})
    return results


def _release(target) -> tuple[str, str] | None:
    lugh = (target.custom or {}).get("lugh") or {}
    return lugh.get("name"), lugh.get("version")


def _result(vendor: str, path: str, wheel: artifact.Wheel, *, published: bool) -> dict:
    m = wheel.manifest
    return {"name": m.name, "version": m.version, "kind": m.kind, "vendor": vendor, "target": path,
            "sha256": wheel.sha256, "length": wheel.length, "published": published}
