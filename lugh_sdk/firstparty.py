"""First-party plugins reach this machine from the working tree (plugins/): each is
built into a wheel by poetry-core and installed into the home's plugin store exactly as
any installed plugin (same RECORD verification, same entry-point loading by the
service host). A plugin whose sources changed since its last install is rebuilt.
"""

from __future__ import annotations

import hashlib
import os
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from kernel import plugin_store
from lugh_sdk.client import LughError
from lugh_sdk.home import source_root

FIRST_PARTY = ("round-robin-scheduler", "priority-scheduler", "edf-scheduler", "sqlite-storage", "heartbeat-monitor")


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
        wheel = build_wheel(project, Path(tmp))
        try:
            Path(tmp).rename(slot)  # atomic: a concurrent builder's result is as good
        except OSError:
            pass
    return next(slot.glob("*.whl"))


def ensure_installed(home: Path, names=FIRST_PARTY) -> list[str]:
    """Install (or refresh) the first-party plugins; returns those (re)installed."""
    store = plugin_store.plugins_dir(home)
    store.mkdir(parents=True, exist_ok=True)
    index_path = store / ".first-party.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    changed = []
    for name in names:
        project = plugins_source() / name
        digest = source_digest(project)
        if index.get(name) == digest and name in plugin_store.installed(home):
            continue
        plugin_store.install_wheel(home, cached_wheel(project, digest), replace=True)
        index[name] = digest
        changed.append(name)
    index_path.write_text(json.dumps(index, indent=2))
    return changed
