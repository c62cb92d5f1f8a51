"""Run reports: markdown and plots comparing EM runs across iterations (``bolt report``)."""

from megatron_bolt.report.render import ReportError, render_report

__all__ = ["ReportError", "render_report"]
