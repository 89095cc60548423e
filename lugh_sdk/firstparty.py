"""First-party plugins reach this machine by the same path as any vendor's: on first
use (``lugh up``, ``lugh demo``) each plugin in plugins/ is built into a wheel by
poetry-core, signed by a vendor key created for this machine (``lughos-firstparty``,
vendor ``lughos`` of the machine's own registry, :mod:`registry.local`), published into
``LUGH_HOME/registry``, and installed through the target's verified install path
(:mod:`kernel.install`: TUF verification, staging, journal, pin, atomic activation).

Boot stays fast: wheels are cached per source state (:func:`cached_wheel`), and when
every first-party plugin is installed from its current sources nothing is imported
beyond a look at the registry's timestamp expiry. A plugin whose sources changed
under an already published version is refused, as for any vendor: published versions
are immutable (bump the version, or use a fresh ``LUGH_HOME``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from kernel import plugin_store
from lugh_sdk.client import LughError
from lugh_sdk.home import source_root

FIRST_PARTY = ("round-robin-scheduler", "priority-scheduler", "edf-scheduler", "sqlite-storage", "memory-storage",
               "heartbeat-monitor")


def plugins_source() -> Path:
    return source_root() / "plugins"


def source_digest(project: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(project.rglob("*")):
        rel = path.relative_to(project)
        if path.is_file() and "__pycache__" not in rel.parts and rel.parts[0] not in ("tests", "dist", ".pytest_cache"):
            h.update(str(rel).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def build_wheel(project: Path, out_dir: Path) -> Path:
    """Build ``project`` with poetry-core (PEP 517) in a child interpreter."""
    code = "import sys; from poetry.core.masonry.api import build_wheel; print(build_wheel(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, str(out_dir)], cwd=project, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LughError(f"building {project.name} failed:\n{proc.stderr.strip()[-2000:]}")
    return out_dir / proc.stdout.strip().splitlines()[-1]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lugh" / "wheels"


def cached_wheel(project: Path, digest: str) -> Path:
    """The wheel built from ``project`` at ``digest``, built once per source state."""
    slot = cache_dir() / f"{project.name}-{digest[:16]}"
    wheels = list(slot.glob("*.whl")) if slot.is_dir() else []
    if wheels:
        return wheels[0]
    slot.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=slot.parent) as tmp:
        build_wheel(project, Path(tmp))
        try:
            Path(tmp).rename(slot)  # atomic: a concurrent builder's result is as good
        except OSError:
            pass
    return next(slot.glob("*.whl"))


VENDOR = "lughos"
KEY_NAME = "lughos-firstparty"


def ensure_installed(home: Path, names=FIRST_PARTY) -> list[str]:
    """Publish and install (or refresh) the first-party plugins; returns those
    (re)installed. No kernel may be running for ``home`` (``lugh up`` checks)."""
    store = plugin_store.plugins_dir(home)
    store.mkdir(parents=True, exist_ok=True)
    index_path = store / ".first-party.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    installed = plugin_store.installed(home)
    todo = []
    for name in names:
        project = plugins_source() / name
        digest = source_digest(project)
        pinned = name in installed and plugin_store.read_pin(home, name, installed[name][-1]) is not None
        if index.get(name) != digest or not pinned:  # (no pin: installed by a LughOS before the registry)
            todo.append((name, project, digest))
    if not todo:
        from registry import local  # light: TUF is imported only if the timestamp needs re-signing

        if local.needs_refresh(home):
            local.ensure(home)  # re-signs snapshot and timestamp
        return []
    from kernel import install
    from registry import local, publish, trust
    from registry.client import Session

    key = local.ensure_vendor(home, VENDOR, list(FIRST_PARTY), KEY_NAME)
    wheels = {name: cached_wheel(project, digest) for name, project, digest in todo}
    try:
        published = publish.publish_many(local.registry_dir(home), list(wheels.values()), VENDOR, key, home=home,
                                         skip_identical=True)
    except plugin_store.PluginError as exc:
        raise LughError(f"first-party plugins could not be published to this machine's registry: {exc}. "
                        f"If a plugin in plugins/ changed, bump its version (pyproject.toml and "
                        f"lugh-plugin.toml), or start from a fresh LUGH_HOME") from None
    target = install.OfflineTarget(home)
    session = Session(trust.get(home, trust.LOCAL))
    changed = []
    try:
        for (name, _, digest), release in zip(todo, published):
            pin = plugin_store.read_pin(home, name, release["version"])
            if release["version"] in installed.get(name, []) and (pin or {}).get("wheel_sha256") != release["sha256"]:
                # installed by an earlier LughOS straight from the sources: replace it
                install.uninstall(target, name, release["version"], force=True)
            result = install.install(target, name, release["version"], session=session, provisioning=True)
            index[name] = digest
            if result["installed"]:
                changed.append(name)
    finally:
        session.close()
        target.close()
        index_path.write_text(json.dumps(index, indent=2))
    return changed

