"""Data labeling: a SQLite-backed store of instruction and conversation records."""

from chattune.label.records import (
    EXPORT_FORMATS,
    STATUSES,
    ExportReport,
    ImportPreview,
    ImportReport,
    LabelStoreError,
    Record,
)
from chattune.label.store import LabelStore

__all__ = [
    "EXPORT_FORMATS",
    "STATUSES",
    "ExportReport",
    "ImportPreview",
    "ImportReport",
    "LabelStore",
    "LabelStoreError",
    "Record",
]
