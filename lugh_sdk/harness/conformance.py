"""The conformance suite: named cases per plugin kind, each a function that drives a
fresh plugin through a real pluggy PluginManager and raises when the plugin breaks a
rule of the plugin API.

The same cases run in a vendor's own pytest suite (a generated project parametrizes a
test over :func:`cases`, so a case added to the SDK shows up there by itself) and in
`lugh check` (:func:`run_suite`). To add a case, decorate a function in the kind's
module (``lugh_sdk/harness/scheduler.py``, ``storage.py``, ``monitor.py``)::

    @case("storage", "empty-commit", needs=("storage_commit",))
    def _(ctx):
        ...  # ctx.new() gives a fresh plugin's hook; raise ConformanceError on a violation

A case whose ``needs`` names a hook that the running API does not define, or an optional
hook the plugin does not implement, is skipped, not failed.
"""

from __future__ import annotations

import importlib
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lugh_sdk.api import KINDS
from lugh_sdk.harness.loader import factory_of, hook_coverage, hook_names, plugin_manager


class ConformanceError(AssertionError):
    """The plugin broke a rule of the plugin API; the message says which."""


class Skipped(Exception):
    """The case does not apply to this plugin or this API version."""


def expect(condition: Any, message: str) -> None:
    if not condition:
        raise ConformanceError(message)


def import_ref(plugin: Any) -> str | None:
    """'module:qualname' naming ``plugin`` for another interpreter, or None when it
    cannot be imported by name (a class defined inside a function, an instance)."""
    if isinstance(plugin, type):
        ref = f"{plugin.__module__}:{plugin.__qualname__}"
    elif hasattr(plugin, "__spec__") and getattr(plugin, "__name__", None):
        ref = f"{plugin.__name__}:"
    else:
        return None
    return None if "<locals>" in ref or ref.startswith("__main__") else ref


@dataclass
class Context:
    """What a case gets: ``new()`` a fresh plugin's hook relay, a private ``workdir``,
    and ``ref`` (see :func:`import_ref`) for cases that need a child process."""

    kind: str
    plugin: Any
    workdir: Path

    def instance(self) -> Any:
        """A fresh plugin object (the same object when the plugin is not a class)."""
        return factory_of(self.plugin)()

    def new(self):
        """The hook relay of a fresh plugin in its own PluginManager."""
        return plugin_manager(self.kind, self.instance()).hook

    def require_fresh(self) -> None:
        """Skip the case unless each ``new()`` is really a new plugin (a class)."""
        if not isinstance(self.plugin, type):
            raise Skipped("the plugin is a single object, not a class: there is no fresh instance to compare with")

    @property
    def ref(self) -> str | None:
        return import_ref(self.plugin)


@dataclass(frozen=True)
class Case:
    kind: str
    name: str
    doc: str
    fn: Callable[[Context], None]
    needs: tuple[str, ...] = ()

    def __str__(self) -> str:  # the pytest id
        return self.name

    def applies(self, plugin: Any) -> str:
        """'' when the case applies, else why it is skipped."""
        api = set(hook_names(self.kind))
        absent = [n for n in self.needs if n not in api]
        if absent:
            return f"this plugin API has no {', '.join(absent)}"
        implemented = set(hook_coverage(plugin_manager(self.kind, factory_of(plugin)()), self.kind).implemented)
        absent = [n for n in self.needs if n not in implemented]
        return f"the plugin does not implement {', '.join(absent)}" if absent else ""

    def check(self, plugin: Any, workdir: Path | str | None = None) -> None:
        """Run the case against ``plugin`` (a class, instantiated afresh as needed, or a
        plugin object). Raises :class:`ConformanceError`; in a pytest run, a case that
        does not apply is reported as skipped."""
        why = self.applies(plugin)
        if why:
            _skip(why)
        if workdir is None:
            with tempfile.TemporaryDirectory(prefix=f"lugh-{self.name}-") as tmp:
                return self._run(plugin, Path(tmp))
        return self._run(plugin, Path(workdir))

    def _run(self, plugin: Any, workdir: Path) -> None:
        try:
            self.fn(Context(kind=self.kind, plugin=plugin, workdir=workdir))
        except Skipped as exc:
            _skip(str(exc))


def _skip(reason: str):
    try:
        import pytest
    except ImportError:
        raise Skipped(reason) from None
    pytest.skip(reason)


_CASES: dict[str, list[Case]] = {kind: [] for kind in KINDS}


def case(kind: str, name: str, *, needs: tuple[str, ...] = ()):
    """Register a conformance case (see the module docstring)."""

    def register(fn: Callable[[Context], None]) -> Callable[[Context], None]:
        if any(c.name == name for c in _CASES[kind]):
            raise ValueError(f"{kind} case {name!r} is registered twice")
        _CASES[kind].append(Case(kind=kind, name=name, doc=(fn.__doc__ or "").strip(), fn=fn, needs=needs))
        return fn

    return register


def cases(kind: str) -> list[Case]:
    """The conformance cases of ``kind``, in a fixed order."""
    if kind not in KINDS:
        raise ValueError(f"unknown plugin kind {kind!r}")
    importlib.import_module(f"lugh_sdk.harness.{kind}")  # registers its cases
    return list(_CASES[kind])


@dataclass(frozen=True)
class CaseResult:
    name: str
    status: str  # passed | failed | skipped
    detail: str = ""


def describe(exc: BaseException) -> str:
    """One readable line for a failed case: the message, and where it was raised when
    the message alone says little (a bare ``assert``, an exception from the plugin)."""
    if isinstance(exc, ConformanceError):
        return str(exc)
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    where = f"{Path(frame.filename).name}:{frame.lineno}"
    if isinstance(exc, AssertionError):
        return f"{exc} (at {where})" if str(exc) else f"assertion failed at {where}: {frame.line}"
    return f"{type(exc).__name__}: {exc} (at {where})"


def run_suite(kind: str, plugin: Any, workdir: Path | None = None) -> list[CaseResult]:
    """Run every case of ``kind`` against ``plugin``; never raises for a plugin's fault."""
    results = []
    with tempfile.TemporaryDirectory(prefix="lugh-conformance-") as tmp:
        base = Path(workdir or tmp)
        for c in cases(kind):
            where = base / c.name
            where.mkdir(parents=True, exist_ok=True)
            try:
                why = c.applies(plugin)
                if why:
                    raise Skipped(why)
                c.fn(Context(kind=kind, plugin=plugin, workdir=where))
            except Skipped as exc:
                results.append(CaseResult(c.name, "skipped", str(exc)))
            except Exception as exc:  # a broken rule, or the plugin raised where the API does not allow it
                results.append(CaseResult(c.name, "failed", describe(exc)))
            else:
                results.append(CaseResult(c.name, "passed"))
    return results
