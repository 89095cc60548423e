"""Installing plugins on a target, transactionally, from a registry it verifies itself.

``lugh install NAME[==VERSION] [--swap]`` reaches :func:`handle` in a control thread of
the running kernel (never the dispatch loop: the loop is only asked, through
``kernel.call``, which plugins its services use). First-party plugins at ``lugh up``
take the same path with no kernel running (:class:`OfflineTarget`).

1. *verify*: refresh the registry's metadata with the target's own trust anchor
   (:mod:`registry.client`), resolve the release from the vendor delegated for its
   name, check its signed description for compatibility (plugin API, kernel version,
   architecture, Python, size) before a byte of it is fetched, download it against
   its signed length and sha256, and inspect the wheel (member names, RECORD, manifest
   equal to the signed description). Nothing on the target has changed yet.
2. ``install.begin`` is journaled; *stage*: the wheel is unpacked into
   ``plugins/.staging-<id>/`` and every file checked against RECORD
   (``install.stage``);
3. *activate* (``install.activate`` journaled first): the verified RECORD's digest is
   pinned outside the plugin's directory (``state/pins/``), then the staged tree is
   moved into ``plugins/<name>/<version>`` in one rename;
4. with ``--swap``: the running service of the plugin's kind swaps live to exactly this
   version (:func:`kernel.swap.run_swap`);
5. ``install.commit``, only once the swap has committed. If anything fails after
   ``install.begin`` -- the swap too -- the swap has rolled back by itself, the
   version is removed again, and ``install.rollback`` says at which step and why: the
   target is as it was. A crash between begin and commit is resolved at the next boot
   (:func:`recover`).

A version that is already installed is not installed again: it is checked against the
registry's release (same sha256) and against its pin, then swapped to if asked.
Installing a new version of a plugin a service uses needs ``--swap`` (else the next
restart would silently change what runs); uninstalling a plugin in use is refused.
``lugh rollback`` undoes the last install or swap that has not been undone (:func:`rollback`).
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
import uuid
from pathlib import Path

from kernel import plugin_store
from kernel.journal import Journal, unfinished
from kernel.plugin_store import PluginError
from kernel.supervisor import ROLLBACK_OP

CALL_TIMEOUT = 30.0
_busy = threading.Lock()  # one install, uninstall or rollback at a time per target
_progress_lock = threading.Lock()
_progress: dict = {}


# --------------------------------------------------------------------------- targets

class KernelTarget:
    """The running kernel: its journal, its services, its live swap."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.home = kernel.home
        self.journal = kernel.journal

    def usage(self) -> dict[tuple[str, str], list[str]]:
        kernel = self.kernel

        def collect():
            specs = {}
            for service in kernel.services.values():
                if service.kind in ("scheduler", "storage", "monitor"):
                    specs.setdefault(service.plugin, []).append(service.name)
                    inst = service.active
                    if inst is not None and inst.plugin:
                        specs.setdefault(f"{inst.plugin}=={inst.plugin_version}", []).append(service.name)
            for inst in kernel.instances.values() if kernel.swapping else ():  # a swap candidate is in use too
                if inst.plugin and inst.service.kind in ("scheduler", "storage", "monitor"):
                    specs.setdefault(f"{inst.plugin}=={inst.plugin_version}", []).append(inst.service.name)
            return specs

        return _resolve_usage(self.home, kernel.call(collect).result(CALL_TIMEOUT))

    def swap(self, service: str, plugin: str, health_window: float) -> dict:
        from kernel.swap import run_swap

        return run_swap(self.kernel, service, plugin, health_window)


class OfflineTarget:
    """This machine's home with no kernel running (``lugh up`` installs the
    first-party plugins before it starts one): the same journal, no live swap."""

    def __init__(self, home: Path):
        self.home = Path(home)
        self._journal = None

    @property
    def journal(self) -> Journal:
        if self._journal is None:
            self._journal = Journal(self.home / "state" / "journal.log")
        return self._journal

    def usage(self) -> dict[tuple[str, str], list[str]]:
        config = self.home / "state" / "services.json"
        plugins = json.loads(config.read_text()).get("plugins", {}) if config.exists() else {}
        specs: dict[str, list[str]] = {}
        for service, spec in plugins.items():
            specs.setdefault(spec, []).append(service)
        return _resolve_usage(self.home, specs)

    def swap(self, service: str, plugin: str, health_window: float) -> dict:
        raise PluginError("no kernel is running on this target: --swap needs one (start it with `lugh up`)")

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _resolve_usage(home: Path, specs: dict[str, list[str]]) -> dict[tuple[str, str], list[str]]:
    """(name, version) -> services, a spec without a version meaning the newest
    installed (what a restart would run)."""
    installed = plugin_store.installed(home)
    out: dict[tuple[str, str], list[str]] = {}
    for spec, services in specs.items():
        name, version = plugin_store.split_spec(spec)
        version = version or (installed.get(name) or [""])[-1]
        users = out.setdefault((name, version), [])
        users += [s for s in dict.fromkeys(services) if s not in users]
    return out


# --------------------------------------------------------------------------- progress

def _set_progress(**fields) -> None:
    with _progress_lock:
        _progress.update(fields)


def _add_bytes(n: int) -> None:
    with _progress_lock:
        _progress["done"] = _progress.get("done", 0) + n


def progress(journal: Journal | None = None) -> dict:
    """What the install in progress is doing (for the CLI's progress bars); during a
    swap, also the swap's last journaled step."""
    with _progress_lock:
        current = dict(_progress)
    if journal is not None:
        open_swaps = unfinished(journal.records(200), "swap")
        if open_swaps:
            op = open_swaps[-1]["data"]["id"]
            steps = [r["op"].split(".", 1)[1] for r in journal.records(200) if r["data"].get("id") == op]
            current["swap"] = {"id": op, "step": steps[-1], "steps": steps}
    return current


# --------------------------------------------------------------------------- install

def install(target, name: str, version: str | None = None, *, registry: str = "local", swap: bool = False,
            health_window: float = 0.3, session=None, provisioning: bool = False) -> dict:
    """Verify, then install ``name`` (newest or ``version``) from ``registry`` on
    ``target``; see the module's docstring. Returns what happened. ``provisioning``
    marks the first-party installs of ``lugh up``, which ``lugh rollback`` leaves be."""
    if not _busy.acquire(blocking=False):
        raise PluginError("another install, uninstall or rollback is in progress on this target; try again")
    try:
        return _install(target, name, version, registry, swap, health_window, session, provisioning)
    except PluginError as exc:
        print(f"install of {name}{'==' + version if version else ''} refused: {exc}", file=sys.stderr, flush=True)
        raise
    finally:
        with _progress_lock:
            _progress.clear()
        _busy.release()


def _install(target, name, version, registry, swap, health_window, session, provisioning) -> dict:
    from registry import artifact, trust
    from registry.client import Session

    home = target.home
    op = uuid.uuid4().hex[:12]
    started = time.monotonic()
    marks = {}

    def mark(phase: str) -> None:
        marks[phase] = round((time.monotonic() - started) * 1000, 1)
        _set_progress(phase=phase)

    _set_progress(id=op, name=name, phase="metadata", done=0, total=0, started=time.time())
    trusted = trust.get(home, registry)
    own = session is None
    session = session or Session(trusted)
    staging = plugin_store.plugins_dir(home) / f".staging-{op}"
    try:
        release = session.resolve(name, version)
        version = release.version
        signed = release.manifest
        plugin_store.check_compatible(signed)  # from the signed description, before any download
        if swap:
            from kernel import swap as live

            swappable = getattr(live, "HANDOVERS", {"scheduler": None})
            if signed.kind not in swappable:
                raise PluginError(f"{name} is a {signed.kind} plugin; live swap is implemented for "
                                  f"{' and '.join(swappable)} services; nothing changed")
        mark("resolved")
        installed = plugin_store.installed(home).get(name, [])
        existing = version in installed
        if existing:
            pin = plugin_store.read_pin(home, name, version) or {}
            if pin.get("wheel_sha256") != release.sha256:
                raise PluginError(f"{name} {version} is installed, but not as the release registry {trusted.name} "
                                  f"signs (sha256 {str(pin.get('wheel_sha256'))[:16]} installed, "
                                  f"{release.sha256[:16]} signed); uninstall it first")
            plugin_store.verify_installed(plugin_store.locate(home, name, version))
            if not swap:
                return {"id": op, "name": name, "version": version, "vendor": release.vendor, "registry": trusted.name,
                        "sha256": release.sha256, "installed": False, "already_installed": True, "committed": True,
                        "swap": None, "timings_ms": marks,
                        "duration_ms": round((time.monotonic() - started) * 1000, 1)}
        else:
            users = [s for (n, _), services in target.usage().items() if n == name for s in services]
            if users and not swap:
                raise PluginError(f"{name} is in use by the {', '.join(sorted(set(users)))} service: install "
                                  f"{name} {version} with --swap, so that it replaces the running version live")
            staging.mkdir(parents=True)
            _set_progress(phase="download", total=release.length, done=0)
            wheel_path = session.download(release, staging / "download", on_bytes=_add_bytes)
            mark("downloaded")
            try:
                wheel = artifact.inspect(wheel_path)
                artifact.check_against_signed(wheel, release.custom, name=name, version=version)
            except PluginError as exc:
                raise PluginError(f"{name} {version} from registry {trusted.name}: {exc}"
                                  + ("" if str(exc).endswith("refused") else "; refused")) from None
            mark("verified")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # refused: nothing on the target changed
        raise
    finally:
        if own:
            session.close()

    journal = target.journal
    journal.append("install.begin", id=op, name=name, version=version, vendor=release.vendor, registry=trusted.name,
                   sha256=release.sha256, swap=swap, existing=existing, provisioning=provisioning)
    step = "stage"
    activated = False
    try:
        if not existing:
            _set_progress(phase="stage")
            tree = staging / "tree"
            tree.mkdir()
            manifest = plugin_store.stage_wheel(wheel_path, tree)
            journal.append("install.stage", id=op, record_sha256=wheel.record_sha256)
            mark("staged")
            step = "activate"
            _set_progress(phase="activate")
            journal.append("install.activate", id=op, path=f"plugins/{name}/{version}")
            plugin_store.activate(home, tree, manifest, source="registry", registry=trusted.name, url=trusted.url,
                                  vendor=release.vendor, wheel_sha256=release.sha256)
            activated = True
            mark("activated")
        swap_result = None
        if swap:
            step = "swap"
            _set_progress(phase="swap")
            swap_result = target.swap(signed.kind, f"{name}=={version}", health_window)
            mark("swapped")
            if not swap_result["committed"]:
                reason = f"the live swap rolled back at its {swap_result['step']} step: {swap_result['reason']}"
                _undo_activation(home, name, version, activated)
                journal.append("install.rollback", id=op, step="swap", reason=reason, swap_id=swap_result["id"])
                print(f"install of {name}=={version} rolled back: {reason}", file=sys.stderr, flush=True)
                return _outcome(op, release, trusted, existing, False, swap_result, marks, started, reason=reason)
        journal.append("install.commit", id=op, name=name, version=version, existing=existing, service=signed.kind,
                       provisioning=provisioning,
                       swap_id=swap_result["id"] if swap_result else None,
                       **({"from": swap_result["previous"]} if swap_result else {}))
        return _outcome(op, release, trusted, existing, True, swap_result, marks, started)
    except Exception as exc:
        reason = str(exc) if isinstance(exc, PluginError) else f"{type(exc).__name__}: {exc}"
        _undo_activation(home, name, version, activated)
        journal.append("install.rollback", id=op, step=step, reason=reason)
        raise PluginError(f"installing {name} {version} failed at its {step} step and was rolled back: {reason}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _undo_activation(home: Path, name: str, version: str, activated: bool) -> None:
    if activated:
        plugin_store.deactivate(home, name, version)


def _outcome(op, release, trusted, existing, committed, swap_result, marks, started, reason="") -> dict:
    return {"id": op, "name": release.name, "version": release.version, "vendor": release.vendor,
            "registry": trusted.name, "sha256": release.sha256, "installed": committed and not existing,
            "already_installed": existing, "committed": committed, "reason": reason, "swap": swap_result,
            "timings_ms": marks, "duration_ms": round((time.monotonic() - started) * 1000, 1)}


# --------------------------------------------------------------------------- uninstall, list

def uninstall(target, name: str, version: str | None = None, *, force: bool = False) -> dict:
    """Remove an installed plugin (all its versions, or one); refused while a service
    uses it (``force``: only for a target with no kernel running)."""
    if not _busy.acquire(blocking=False):
        raise PluginError("another install, uninstall or rollback is in progress on this target; try again")
    try:
        home = target.home
        versions = plugin_store.installed(home).get(name)
        if not versions:
            raise PluginError(f"plugin {name!r} is not installed on this target")
        if version is not None:
            if version not in versions:
                raise PluginError(f"{name} {version} is not installed (installed: {', '.join(versions)})")
            versions = [version]
        usage = {} if force and isinstance(target, OfflineTarget) else target.usage()
        for v in versions:
            if (name, v) in usage:
                raise PluginError(f"{name} {v} is in use by the {', '.join(usage[(name, v)])} service; swap that "
                                  f"service to another plugin first; nothing changed")
        op = uuid.uuid4().hex[:12]
        target.journal.append("uninstall.begin", id=op, name=name, versions=versions)
        for v in versions:
            plugin_store.deactivate(home, name, v)
        target.journal.append("uninstall.commit", id=op, name=name, versions=versions)
        return {"id": op, "name": name, "removed": versions}
    finally:
        _busy.release()


def listing(target) -> list[dict]:
    """Installed plugins, each version with its kind, vendor, registry, whether its
    files still match its pin, and which services use it."""
    home = target.home
    usage = target.usage()
    out = []
    for name, versions in plugin_store.installed(home).items():
        for v in versions:
            root = plugin_store.locate(home, name, v)
            pin = plugin_store.read_pin(home, name, v) or {}
            try:
                plugin_store.verify_installed(root)
                integrity = "ok"
            except PluginError as exc:
                integrity = str(exc)
            try:
                kind = plugin_store.read_manifest(root).kind
            except PluginError:
                kind = pin.get("kind", "?")
            out.append({"name": name, "version": v, "kind": kind, "vendor": pin.get("vendor", ""),
                        "registry": pin.get("registry", pin.get("source", "")),
                        "installed_at": pin.get("installed_at"), "integrity": integrity,
                        "in_use_by": usage.get((name, v), [])})
    return out


# --------------------------------------------------------------------------- rollback

def last_undoable(records: list[dict]) -> dict | None:
    """The last committed install or swap not undone yet, neither by ``lugh rollback``
    (``undo.commit``) nor by the kernel after a crash loop (``crashloop.rollback``); both
    name the change they reverted in ``undoes``. Swaps made by an install or by an undo
    belong to that operation: an install whose swap a crash-loop rollback reverted is
    undone, and such a swap is never undone on its own."""
    undone: set = set()
    owned: set = set()
    for rec in reversed(records):
        op, data = rec["op"], rec["data"]
        if op in ("undo.commit", ROLLBACK_OP):
            undone.add(data.get("undoes"))
            owned.add(data.get("swap_id"))
        elif op == "install.commit":
            owned.add(data.get("swap_id"))
            ids = {data.get("id"), data.get("swap_id")} - {None, ""}
            if not ids & undone and not data.get("provisioning"):
                return rec
        elif op == "swap.commit" and data.get("id") not in undone | owned:
            return rec
    return None


def rollback(target, health_window: float = 0.3) -> dict:
    """Undo the last install or swap on the target, from the journal."""
    if not _busy.acquire(blocking=False):
        raise PluginError("another install, uninstall or rollback is in progress on this target; try again")
    try:
        journal = target.journal
        rec = last_undoable(journal.records())
        if rec is None:
            raise PluginError("the journal has no install or swap left to undo (each one on record was undone "
                              "already, by `lugh rollback` or by an automatic crash-loop rollback)")
        data = rec["data"]
        op = uuid.uuid4().hex[:12]
        what = "install" if rec["op"] == "install.commit" else "swap"
        journal.append("undo.begin", id=op, undoes=data["id"], what=what)
        swap_id = removed = None
        try:
            back_to = data.get("from")
            if back_to:
                result = target.swap(data.get("service") or "scheduler", back_to, health_window)
                if not result["committed"]:
                    raise PluginError(f"the swap back to {back_to} rolled back at its {result['step']} step: "
                                      f"{result['reason']}")
                swap_id = result["id"]
            if what == "install" and not data.get("existing"):
                name, version = data["name"], data["version"]
                usage = target.usage()
                if (name, version) in usage:
                    raise PluginError(f"{name} {version} is in use by the {', '.join(usage[(name, version)])} "
                                      f"service")
                plugin_store.deactivate(target.home, name, version)
                removed = f"{name}=={version}"
        except Exception as exc:
            reason = str(exc) if isinstance(exc, PluginError) else f"{type(exc).__name__}: {exc}"
            journal.append("undo.rollback", id=op, undoes=data["id"], reason=reason, swap_id=swap_id)
            raise PluginError(f"could not undo the last {what} ({data['id']}): {reason}") from None
        journal.append("undo.commit", id=op, undoes=data["id"], what=what, swap_id=swap_id, removed=removed)
        return {"id": op, "undid": what, "undoes": data["id"], "swapped_back_to": data.get("from"),
                "removed": removed}
    finally:
        _busy.release()


# --------------------------------------------------------------------------- boot

def recover(home: Path, journal: Journal) -> None:
    """Resolve installs a crash left open (after the swap recovery, which has reverted
    an uncommitted swap or rolled a committed one forward): an install whose swap
    committed is rolled forward; any other is reverted. Also finishes an interrupted
    uninstall and removes staging leftovers."""
    records = journal.records()
    for rec in unfinished(records, "install"):
        data = rec["data"]
        op, name, version = data["id"], data["name"], data["version"]
        spec = f"{name}=={version}"
        swapped = any(r["op"] in ("swap.commit", "swap.rollforward") and r["data"].get("to") == spec
                      and r["seq"] > rec["seq"] for r in records)
        if data.get("swap") and swapped:
            journal.append("install.commit", id=op, name=name, version=version, existing=data.get("existing", False),
                           reason="rolled forward at boot: its swap had committed")
            continue
        activated = any(r["op"] == "install.activate" and r["data"].get("id") == op for r in records)
        if activated and not data.get("existing"):
            plugin_store.deactivate(home, name, version)
        journal.append("install.rollback", id=op, step="boot",
                       reason="not committed when the kernel stopped; reverted at boot")
    for rec in unfinished(records, "uninstall"):
        for v in rec["data"].get("versions", []):
            plugin_store.deactivate(home, rec["data"]["name"], v)
        journal.append("uninstall.commit", id=rec["data"]["id"], name=rec["data"]["name"],
                       versions=rec["data"].get("versions", []), reason="completed at boot")
    for rec in unfinished(records, "undo"):
        journal.append("undo.rollback", id=rec["data"]["id"], undoes=rec["data"].get("undoes"),
                       reason="interrupted by a stop of the kernel; run `lugh rollback` again")
    base = plugin_store.plugins_dir(home)
    if base.is_dir():
        for leftover in list(base.glob(".staging-*")) + list(base.glob(".trash-*")):
            shutil.rmtree(leftover, ignore_errors=True)


# --------------------------------------------------------------------------- control channel

def handle(kernel, req) -> dict:
    """The control channel's install requests (run in a control thread)."""
    from kernel import protocol

    target = KernelTarget(kernel)
    if isinstance(req, protocol.InstallReq):
        return install(target, req.name, req.version or None, registry=req.registry, swap=req.swap,
                       health_window=req.health_window_ms / 1000.0)
    if isinstance(req, protocol.UninstallReq):
        return uninstall(target, req.name, req.version or None)
    if isinstance(req, protocol.PluginListReq):
        return {"plugins": listing(target)}
    if isinstance(req, protocol.RollbackReq):
        return rollback(target, req.health_window_ms / 1000.0)
    if isinstance(req, protocol.ProgressReq):
        return progress(kernel.journal)
    raise ValueError(f"unsupported request {type(req).__name__}")
