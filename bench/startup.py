"""Cold start of the command line: `lugh --help` beside `python -c pass`.

Each run is a new process, started and waited for from here (wall time, start to exit,
output discarded); the two commands alternate, run for run, so that a change of load
on the machine falls on both alike. The figures are the medians of ``--runs`` runs of
each; the ratio is lugh's median over python's. `lugh` is the console script installed
beside this interpreter (what a user types), or ``python -m lugh_sdk`` when there is
none. Neither is warmed up beyond the first, discarded, pair (page cache, .pyc files).

    python bench/startup.py [--runs 21] [--json]
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import arguments, emit, goal, progress, ratio, run, table  # noqa: E402

RATIO_LIMIT = 20.0


def lugh_command() -> list[str]:
    script = Path(sys.executable).with_name("lugh")
    if script.exists():
        return [str(script)]
    found = shutil.which("lugh")
    return [found] if found else [sys.executable, "-m", "lugh_sdk"]


def wall(cmd: list[str]) -> float:
    began = time.perf_counter()
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    took = time.perf_counter() - began
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with status {proc.returncode}: {proc.stderr.decode()[-500:]}")
    return took


def main() -> int:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21, help="runs of each command (default 21; --quick: 9)")
    args = parser.parse_args()
    runs = 9 if args.quick else args.runs
    if runs < 1:
        parser.error("--runs must be at least 1")
    help_cmd, pass_cmd = [*lugh_command(), "--help"], [sys.executable, "-c", "pass"]
    progress(f"{runs} runs each of `{' '.join(help_cmd)}` and `{' '.join(pass_cmd)}`, alternating")
    wall(help_cmd), wall(pass_cmd)  # first pair discarded: it pays for cold .pyc and page cache
    helps, passes = [], []
    for _ in range(runs):
        helps.append(wall(help_cmd))
        passes.append(wall(pass_cmd))
    help_s, pass_s = statistics.median(helps), statistics.median(passes)
    value = ratio(help_s, pass_s)
    result = {
        "benchmark": "startup", "runs": runs, "command": help_cmd,
        "help_s": round(help_s, 4), "python_pass_s": round(pass_s, 4), "ratio": value,
        "help_min_s": round(min(helps), 4), "help_max_s": round(max(helps), 4),
        "python_pass_min_s": round(min(passes), 4), "python_pass_max_s": round(max(passes), 4),
        "goal": goal(f"lugh --help / python -c pass <= {RATIO_LIMIT:g}", value=value, limit=RATIO_LIMIT),
    }
    text = table(["command", "median s", "min s", "max s"], [
        [" ".join(["lugh", "--help"]), result["help_s"], result["help_min_s"], result["help_max_s"]],
        ["python -c pass", result["python_pass_s"], result["python_pass_min_s"], result["python_pass_max_s"]],
    ])
    text += f"\n\nratio of the medians: {value} ({runs} runs each, alternating)"
    emit(result, args.json, text)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
