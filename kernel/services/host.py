"""The service host: one process, one plugin. ``python -m kernel.services.host``.

Order matters and is the point of this module: verify the plugin's installed RECORD
against the digest pinned outside its directory at installation, and its files against
that RECORD, check its manifest (kind, plugin API, architecture, Python), and only
then import it, through its ``lugh.plugins`` entry point, into a pluggy PluginManager
that knows only the hookspecs of its kind. pluggy's own ``load_setuptools_entrypoints``
is not used: it would import whatever is on the path without checking it.

A plugin that fails verification or import makes the process exit with status 3 and
its reason as the last line of its log, which the kernel shows in `lugh status`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import sys
from pathlib import Path

import pluggy

from kernel import plugin_store
from kernel.processes import die_with_parent
from kernel.services import loop
from lugh_sdk.api import PROJECT

EXIT_PLUGIN_REFUSED = 3
KINDS = ("scheduler", "storage", "monitor")


def load_plugin(plugin_dir: Path, kind: str) -> tuple[pluggy.PluginManager, plugin_store.Manifest]:
    """Verify (RECORD against the pin taken at installation, every file against
    RECORD), check and load the plugin installed in ``plugin_dir``."""
    plugin_store.verify_installed(plugin_dir)
    manifest = plugin_store.read_manifest(plugin_dir)
    plugin_store.check_compatible(manifest, kind=kind)
    dists = list(importlib.metadata.distributions(path=[str(plugin_dir)]))
    entries = [ep for d in dists for ep in d.entry_points if ep.group == "lugh.plugins"]
    if len(entries) != 1:
        raise plugin_store.PluginError(f"{manifest.name}: expected one 'lugh.plugins' entry point, found {len(entries)}")
    if entries[0].value != manifest.entry:
        raise plugin_store.PluginError(f"{manifest.name}: entry point {entries[0].value} differs from manifest {manifest.entry}")
    sys.dont_write_bytecode = True  # a .pyc written next to the plugin would fail the next verification
    sys.path.insert(0, str(plugin_dir))
    obj = entries[0].load()
    plugin = obj() if isinstance(obj, type) else obj
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(importlib.import_module(f"lugh_sdk.api.{kind}"))
    pm.register(plugin, name=manifest.name)
    pm.check_pending()
    return pm, manifest


class InjectedFault(RuntimeError):
    """Raised into a plugin hook call by `lugh chaos`."""


class FaultInjector:
    """`lugh chaos` makes a plugin raise: once armed (``InjectFault`` from the kernel),
    the plugin's next hook call raises, out of the pluggy hook call exactly where an
    exception of the plugin's own would come out, so the service's real error path runs.
    The tracer is only installed while armed: nothing is paid otherwise."""

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm
        self._undo = None

    def arm(self, fault: str) -> None:
        if self._undo is None:
            self._undo = self.pm.add_hookcall_monitoring(self._before, lambda *a: None)

    def _before(self, hook_name, hook_impls, kwargs) -> None:
        undo, self._undo = self._undo, None
        if undo is not None:
            undo()
            raise InjectedFault(f"fault injected into {hook_name} by lugh chaos")


def await_identity() -> list[str] | None:
    """A spare (``--spare``, :class:`kernel.processes.Spare`): import everything a host
    of any kind needs, then wait for the kernel to say who this process is: its
    arguments and the rest of its environment (its token), one JSON line on stdin.
    None: the kernel closed stdin without taking it."""
    die_with_parent(int(os.environ["LUGH_PARENT_PID"]))
    for kind in KINDS:
        importlib.import_module(f"kernel.services.{kind}")
    line = sys.stdin.buffer.readline()
    if not line:
        return None
    identity = json.loads(line)
    os.environ.update(identity["env"])
    return identity["argv"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--spare"]:
        argv = await_identity()
        if argv is None:
            return 0
    parser = argparse.ArgumentParser(prog="kernel.services.host")
    parser.add_argument("--peer", required=True)
    parser.add_argument("--kind", required=True, choices=KINDS)
    parser.add_argument("--plugin-dir", required=True, type=Path)
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--heartbeat", type=float, default=0.1)
    parser.add_argument("--standby", action="store_true", help="hot standby: loaded, waiting until promoted")
    args = parser.parse_args(argv)
    die_with_parent(int(os.environ["LUGH_PARENT_PID"]))
    try:
        pm, manifest = load_plugin(args.plugin_dir, args.kind)
    except Exception as exc:  # anything a plugin does at import is its failure, not ours
        loop.report_error(f"plugin refused ({args.plugin_dir.name})", exc)
        return EXIT_PLUGIN_REFUSED
    stream = loop.Stream()
    module = importlib.import_module(f"kernel.services.{args.kind}")
    link = promote = None
    ahead: dict = {}  # what a standby prepared while it waited, for its Server
    if args.standby:
        # A hot standby: started, verified and imported; the service itself (its data
        # set opened, its position read) is built only when it takes over, so that it
        # starts from what the failed incarnation left.
        link = loop.connect_from_env(args.peer, plugin=manifest.name, plugin_version=manifest.version)
        prepare = getattr(module, "prepare_standby", None)  # what a kind can do ahead, while it waits
        if prepare is not None:
            try:
                with loop.BusyBeat(link, stream, period=args.heartbeat)():
                    ahead = prepare(pm.hook, args)
            except Exception as exc:
                loop.report_error(f"{manifest.name}: the standby's preparation failed", exc)
                link.close()
                return EXIT_PLUGIN_REFUSED
        promote = loop.await_promotion(link, args.heartbeat)
        if promote is None:
            link.close()
            return 0
    try:
        server = module.Server(pm.hook, stream, args, **ahead)
    except Exception as exc:
        loop.report_error(f"{manifest.name} failed to start", exc)
        if promote is not None:
            loop.promoted(link, promote, stream, error=f"{type(exc).__name__}: {exc}")
            link.close()
        return EXIT_PLUGIN_REFUSED
    server.inject_fault = FaultInjector(pm).arm
    if promote is None:
        link = loop.connect_from_env(args.peer, plugin=manifest.name, plugin_version=manifest.version,
                                     applied_seq=stream.position())
    else:
        loop.promoted(link, promote, stream)
    try:
        loop.serve(link, server, stream, args.heartbeat)
    finally:
        getattr(server, "close", lambda: None)()
        link.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
