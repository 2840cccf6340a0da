"""The compare report's contract (`imzarr.compare/1`): its schema name and its per-class dimension.

Per-class values are variables on dimension `label`, with `synset` and `class_name` beside them, as in the image
and activation stores; reports written before 2026-12-06 named that dimension `class`, and every reader renames it
on open (`on_label_dimension`)."""

from __future__ import annotations

from typing import Any

COMPARE_SCHEMA = "imzarr.compare/1"
REPORT_DIM = "label"
OLDER_REPORT_DIM = "class"
REPORT_DIMS = (REPORT_DIM, OLDER_REPORT_DIM)


def on_label_dimension(report: Any) -> Any:
    """The report (an xarray Dataset) with its per-class dimension named `label`."""
    return report.rename({OLDER_REPORT_DIM: REPORT_DIM}) if OLDER_REPORT_DIM in report.dims else report
