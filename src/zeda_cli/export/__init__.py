"""``zeda export``: a verified run folder -> the publishable model (shards, config, loading code, card)."""

from .formats import FORMATS
from .run import ExportResult, export_run

__all__ = ["FORMATS", "ExportResult", "export_run"]
