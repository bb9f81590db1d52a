"""The offline HTML report of a run (``gig report RUN_DIR``): graph viewer, concept atlas,
concept localisation, metrics. See docs/report.md.

>>> from gig.report import build_report
>>> build_report("runs/demo")          # doctest: +SKIP
PosixPath('runs/demo/report/index.html')
"""

from .builder import ReportOptions, build_report, markdown_blocks, safe_json
from .figure import draw_class_figure

__all__ = ["ReportOptions", "build_report", "draw_class_figure", "markdown_blocks", "safe_json"]
