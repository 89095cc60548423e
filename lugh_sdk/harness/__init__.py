"""The vendor test harness: test a plugin from its own pytest suite, without a kernel.

- schedulers: :func:`simulate` runs one against periodic tasks in simulated time (one
  CPU, exact preemption, the kernel's protocol and checks) and reports deadline misses,
  response times and the decision trace (:mod:`lugh_sdk.harness.scheduler`);
- storage backends: the conformance suite (:mod:`lugh_sdk.harness.storage`);
- monitors: :func:`replay` of recorded events (:mod:`lugh_sdk.harness.monitor`);
- every kind: :func:`cases` / :func:`run_suite`, the conformance suite `lugh check`
  runs (:mod:`lugh_sdk.harness.conformance`), and :func:`plugin_manager`, which loads a
  plugin into pluggy exactly as the service host does.

A test module typically has::

    from lugh_sdk import harness

    @pytest.mark.parametrize("case", harness.cases("scheduler"), ids=str)
    def test_conformance(case, tmp_path):
        case.check(MyScheduler, tmp_path)
"""

from lugh_sdk.harness.conformance import Case, CaseResult, ConformanceError, cases, run_suite
from lugh_sdk.harness.loader import hook_coverage, plugin_manager
from lugh_sdk.harness.monitor import Event, load_events, replay, sample_events
from lugh_sdk.harness.scheduler import Decision, SimResult, simulate, utilisation

__all__ = [
    "Case", "CaseResult", "ConformanceError", "cases", "run_suite",
    "hook_coverage", "plugin_manager",
    "Event", "load_events", "replay", "sample_events",
    "Decision", "SimResult", "simulate", "utilisation",
]
