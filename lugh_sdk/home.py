"""Where LughOS keeps its state on this machine: ``LUGH_HOME``, by default
``$XDG_DATA_HOME/lugh`` (``~/.local/share/lugh``)."""

from __future__ import annotations

import os
from pathlib import Path


def lugh_home(explicit: str | os.PathLike | None = None) -> Path:
    if explicit:
        return Path(explicit).expanduser().resolve()
    if os.environ.get("LUGH_HOME"):
        return Path(os.environ["LUGH_HOME"]).expanduser().resolve()
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return (Path(data) / "lugh").resolve()


def source_root() -> Path:
    """The working tree this SDK runs from (first-party plugins and templates live there)."""
    return Path(__file__).resolve().parent.parent
