"""`lugh new`: render templates/ into a new plugin project.

Templates are plain files under ``templates/common`` (every kind) and
``templates/<kind>`` (that kind; a file there replaces the common one at the same
path). A name ending in ``.tmpl`` is rendered with :class:`string.Template` (``$name``,
``$module``... see :func:`variables`) and loses the suffix; ``__module__`` in a path
becomes the package name; a leading ``dot-`` becomes ``.``. Anything else is copied.

The project is rendered into a temporary directory beside the destination and renamed
into place, so a failure leaves nothing behind; every check on the name and the
destination runs before anything is written.
"""

from __future__ import annotations

import getpass
import importlib.util
import keyword
import os
import re
import shutil
import string
import tempfile
from pathlib import Path

from kernel.plugin_store import NAME_RE
from lugh_sdk.api import KINDS, PLUGIN_API_VERSION
from lugh_sdk.errors import LughError
from lugh_sdk.home import source_root

PROJECT_VERSION = "0.1.0"
PYTHON_RANGE = ">=3.11"
VENDOR_RE = re.compile(r"^[a-z][a-z0-9-]{1,63}$")  # as registry.repo.VENDOR_RE
RESERVED_VENDORS = ("root", "targets", "snapshot", "timestamp")  # registry.repo.TOP_ROLES: TUF's own roles
# A plugin's package is put first on the service host's sys.path: its name must not
# shadow a module the host (or the plugin's own tests) import.
RESERVED_MODULES = {"tests", "test", "conftest", "kernel", "lugh_sdk", "registry", "plugins", "templates"}
_DESCRIPTIONS = {
    "scheduler": "A deadline-monotonic preemptive scheduler for LughOS",
    "storage": "A durable transactional key-value storage backend for LughOS",
    "monitor": "A deadline-miss monitor for LughOS",
}


def templates_root() -> Path:
    return source_root() / "templates"


def api_range(version: str = PLUGIN_API_VERSION) -> str:
    """The range a new plugin declares: from the running API to the next major version."""
    major, minor = (int(p) for p in version.split(".")[:2])
    return f">={major}.{minor},<{major + 1}"


def module_name(name: str) -> str:
    return name.replace("-", "_")


def class_name(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("-"))


def check_name(name: str) -> None:
    """Refuse a plugin name that cannot be a distribution, a manifest name and an
    importable package that shadows nothing."""
    if not NAME_RE.match(name) or name.endswith("-") or "--" in name:
        raise LughError(f"{name!r} is not a valid plugin name: use 2 to 64 lowercase letters, digits and single "
                        "'-', starting with a letter and not ending with '-' (e.g. my-scheduler)")
    module = module_name(name)
    if keyword.iskeyword(module) or module in RESERVED_MODULES:
        raise LughError(f"{name!r} cannot be a plugin name: its package {module!r} is a reserved word")
    try:
        taken = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        taken = True
    if taken:
        raise LughError(f"{name!r} cannot be a plugin name: its package {module!r} would shadow the module of that "
                        "name that is already importable here; choose another name (a vendor prefix helps)")


def default_vendor() -> str:
    """$LUGH_VENDOR, else the login name made fit for a vendor name, else 'vendor' (also
    for a login such as 'root', which a registry keeps for its own role)."""
    raw = os.environ.get("LUGH_VENDOR")
    if raw:
        return raw
    try:
        raw = getpass.getuser()
    except (KeyError, OSError):
        raw = ""
    cleaned = re.sub(r"[^a-z0-9-]+", "-", raw.lower()).strip("-")
    return cleaned if VENDOR_RE.match(cleaned) and cleaned not in RESERVED_VENDORS else "vendor"


def check_vendor(vendor: str) -> None:
    if not VENDOR_RE.match(vendor):
        raise LughError(f"{vendor!r} is not a valid vendor name: lowercase letters, digits and '-', "
                        "starting with a letter, 2 to 64 of them")
    if vendor in RESERVED_VENDORS:
        raise LughError(f"{vendor!r} cannot be a vendor name: registries use it for their own "
                        f"{', '.join(RESERVED_VENDORS)} roles")


def variables(kind: str, name: str, vendor: str) -> dict[str, str]:
    module = module_name(name)
    cls = class_name(name)
    return {
        "name": name, "module": module, "class_name": cls, "kind": kind, "vendor": vendor,
        "version": PROJECT_VERSION, "api_range": api_range(), "api_version": PLUGIN_API_VERSION,
        "python": PYTHON_RANGE, "entry": f"{module}.plugin:{cls}",
        "description": f"{_DESCRIPTIONS[kind]} (by {vendor}).",
    }


def _sources(kind: str) -> dict[Path, Path]:
    """Relative template path -> file; the kind's files replace the common ones."""
    files: dict[Path, Path] = {}
    for layer in ("common", kind):
        base = templates_root() / layer
        if not base.is_dir():
            raise LughError(f"the templates are missing: {base} does not exist")
        for path in sorted(base.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                files[path.relative_to(base)] = path
    return files


def _target_path(rel: Path, values: dict[str, str]) -> Path:
    parts = []
    for part in rel.parts:
        part = part.replace("__module__", values["module"])
        if part.startswith("dot-"):
            part = "." + part[len("dot-"):]
        parts.append(part.removesuffix(".tmpl"))
    return Path(*parts)


def render(kind: str, values: dict[str, str], out: Path) -> list[Path]:
    """Render the templates of ``kind`` into the existing directory ``out``."""
    written = []
    for rel, src in _sources(kind).items():
        dest = out / _target_path(rel, values)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.name.endswith(".tmpl"):
            try:
                text = string.Template(src.read_text()).substitute(values)
            except (KeyError, ValueError) as exc:
                raise LughError(f"template {src} is broken: {exc}") from None
            dest.write_text(text)
        else:
            shutil.copyfile(src, dest)
        written.append(dest.relative_to(out))
    return written


def new_project(kind: str, name: str, *, vendor: str | None = None, directory: Path | str | None = None) -> Path:
    """Create the plugin project ``name`` of ``kind`` in ``directory`` (default:
    ./NAME), which must not exist. Returns its path; raises LughError, having written
    nothing, when the kind, name, vendor or directory is not acceptable."""
    if kind not in KINDS:
        raise LughError(f"unknown plugin kind {kind!r}: choose one of {', '.join(KINDS)}")
    check_name(name)
    vendor = vendor if vendor is not None else default_vendor()
    check_vendor(vendor)
    dest = Path(directory if directory is not None else name).expanduser().absolute()
    if dest.exists() or dest.is_symlink():
        raise LughError(f"{dest} already exists: choose another directory with --dir, or remove it")
    values = variables(kind, name, vendor)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.lugh-new-", dir=dest.parent))
    try:
        render(kind, values, staging)
        os.chmod(staging, 0o777 & ~_umask())
        os.rename(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
