"""The README's first command: `lugh demo` runs headless, swaps live (to priority, then
installs edf from the machine's registry and swaps to it), loses nothing, and leaves no
process behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys


def test_demo_runs_without_a_terminal(tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=os.environ.get("XDG_CACHE_HOME", str(tmp_path / "cache")))
    home = tmp_path / "demo-home"
    proc = subprocess.run([sys.executable, "-m", "lugh_sdk", "demo", "--duration", "8", "--home", str(home)],
                          env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "Swapped scheduler: round-robin-scheduler -> priority-scheduler" in out.replace("\n", " ")
    assert "Swapped scheduler: priority-scheduler -> edf-scheduler==1.0.0" in " ".join(out.split())
    assert "lugh install edf-scheduler --swap: edf-scheduler 1.0.0 from registry local" in " ".join(out.split())
    flat = " ".join(out.split())
    assert re.search(r"jobs lost 0, messages lost 0", flat)
    assert "Shut down cleanly" in out
    assert "\x1b[" not in out  # plain output when stdout is not a terminal
    from conftest import processes_of

    assert processes_of(home) == []
