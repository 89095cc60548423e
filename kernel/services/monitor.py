"""Monitor service: hands the kernel's events to a monitor plugin; answers reports."""

from __future__ import annotations

from kernel import protocol
from kernel.services.loop import report_error


class Server:
    def __init__(self, hook, stream, args):
        self.hook = hook
        self.stream = stream

    def handle(self, msg):
        try:
            if isinstance(msg, protocol.Event):
                self.hook.monitor_event(kind=msg.kind, data=msg.data, at=msg.at)
            elif isinstance(msg, protocol.ReportRequest):
                return protocol.MonitorReport(req=msg.req, report=self.hook.monitor_report() or {})
        except Exception as exc:
            self.stream.errors += 1
            report_error(type(msg).__name__, exc)
        return None
