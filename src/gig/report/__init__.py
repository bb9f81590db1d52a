"""The offline HTML report of a run (``gig report RUN_DIR``): graph viewer, concept atlas,
concept localisation, metrics. See docs/report.md.

>>> from gig.report import build_report
>>> build_report("runs/demo")          # doctest: +SKIP
PosixPath('runs/demo/report/index.html')
"""

from .builder import ReportOptions, build_report
from .metrics import markdown_blocks
from .page import safe_json

__all__ = ["ReportOptions", "build_report", "markdown_blocks", "safe_json"]
