"""Data labeling: a SQLite-backed store of instruction and conversation records."""

from chattune.label.store import (
    EXPORT_FORMATS,
    STATUSES,
    ExportReport,
    ImportPreview,
    ImportReport,
    LabelStore,
    LabelStoreError,
    Record,
)

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
