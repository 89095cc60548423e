"""`lugh` starts fast because it imports lazily: `lugh --help` (and a command's help)
must not import rich, the plugin host or the IPC stack. Checked in a fresh interpreter,
since this test process has imported all of them already. (How fast: bench/startup.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import json, sys
sys.argv = ["lugh", *json.loads(sys.argv[1])]
from lugh_sdk.cli import main
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
heavy = ["rich", "typer.rich_utils", "pynng", "msgspec", "pluggy", "kernel.protocol", "registry.trust"]
print(json.dumps({"code": code, "loaded": [m for m in heavy if m in sys.modules]}), file=sys.stderr)
"""


def help_of(*args: str) -> tuple[str, dict]:
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(list(args))], capture_output=True, text=True,
                          timeout=60)
    return proc.stdout, json.loads(proc.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [["--help"], ["install", "--help"], ["kv", "--help"], ["task", "add", "--help"]])
def test_help_imports_none_of_the_heavy_modules(args):
    out, probe = help_of(*args)
    assert probe["code"] in (0, None), (out, probe)
    assert "Usage: lugh" in out, out
    assert probe["loaded"] == [], probe


def test_top_level_help_lists_every_command_group():
    out, _ = help_of("--help")
    for command in ("up", "down", "status", "swap", "install", "task", "kv", "target", "keys", "registry"):
        assert f"  {command} " in out, (command, out)
