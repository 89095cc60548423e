"""Where a kernel keeps its things, under its home directory (``LUGH_HOME``).

- ``state/``: the journal, the active configuration, the saved tasks (durable);
- ``data/<service>/``: each service's own data directory;
- ``plugins/``: installed plugins (:mod:`kernel.plugin_store`);
- the runtime directory: sockets, pid, lock and logs, mode 0700. It is ``run/`` under
  the home, unless that path is too long for a Unix socket address (108 bytes), in
  which case it is ``/tmp/lugh-<uid>-<hash of home>``, and ``run`` is a link to it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# The exit status of a kernel that found the run directory's lock taken (another kernel
# serves this home). Not 2: argparse exits 2 on a usage error.
EXIT_ALREADY_RUNNING = 3

_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; leave room for the longest socket name


def run_dir(home: Path) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    local = home / "run"
    if len(str(local)) + len("/scheduler-999.h") <= _SOCKET_PATH_MAX:
        if local.is_symlink():
            local.unlink()
        local.mkdir(mode=0o700, exist_ok=True)
        os.chmod(local, 0o700)
        return local
    short = Path("/tmp") / f"lugh-{os.getuid()}-{hashlib.sha256(str(home).encode()).hexdigest()[:12]}"
    short.mkdir(mode=0o700, exist_ok=True)
    os.chmod(short, 0o700)
    if not local.is_symlink():
        if local.exists():
            local.rmdir()
        local.symlink_to(short)
    return short


def control_address(run: Path) -> str:
    return f"ipc://{run}/control"


def clear_stale(run: Path) -> None:
    """Remove socket files a killed kernel left behind, so they block nothing."""
    for path in run.iterdir():
        if path.suffix in (".h", ".m", ".l") or path.name == "control":
            path.unlink(missing_ok=True)
