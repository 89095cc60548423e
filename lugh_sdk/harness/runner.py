"""`lugh check`'s child process: load an installed plugin exactly as the service host
does, then check its hooks and run the conformance suite, and write the outcome as
JSON to a file (stdout belongs to the plugin, which may print).

``python -m lugh_sdk.harness.runner PLUGIN_DIR KIND OUT_JSON [--no-conformance]``

``PLUGIN_DIR`` is ``<home>/plugins/<name>/<version>`` of a scratch home the plugin was
installed into (with its pin), so that :func:`kernel.services.host.load_plugin` checks
it as on a target: RECORD against the pin, files against RECORD, the manifest and its
compatibility, the entry point against the manifest; then import and registration in a
PluginManager with the kind's hookspecs and nothing else.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path


def _resolve(entry: str):
    module, _, attr = entry.partition(":")
    obj = importlib.import_module(module)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj


def run(plugin_dir: Path, kind: str, conformance: bool = True) -> dict:
    from kernel.plugin_store import PluginError
    from kernel.services.host import load_plugin
    from lugh_sdk.harness.conformance import describe, run_suite
    from lugh_sdk.harness.loader import hook_coverage

    out: dict = {"load": None, "hooks": None, "cases": []}
    try:
        pm, manifest = load_plugin(plugin_dir, kind)
    except PluginError as exc:
        out["load"] = {"ok": False, "detail": str(exc)}
        return out
    except Exception as exc:  # the plugin failed at import
        out["load"] = {"ok": False, "detail": f"importing the plugin failed: {describe(exc)}"}
        return out
    out["load"] = {"ok": True, "detail": f"{manifest.name} {manifest.version} loaded from {manifest.entry}"}
    coverage = hook_coverage(pm, kind)
    groups = f"; optional groups: {', '.join(coverage.groups)}" if coverage.groups else ""
    out["hooks"] = {"ok": coverage.complete,
                    "detail": coverage.problem() or f"{len(coverage.implemented)} {kind} hooks implemented{groups}"}
    if conformance and coverage.complete:
        results = run_suite(kind, _resolve(manifest.entry))
        out["cases"] = [{"name": r.name, "status": r.status, "detail": r.detail} for r in results]
    return out


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    conformance = "--no-conformance" not in args
    args = [a for a in args if a != "--no-conformance"]
    plugin_dir, kind, out = Path(args[0]), args[1], Path(args[2])
    sys.dont_write_bytecode = True
    result = run(plugin_dir, kind, conformance)
    out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
