"""What a run reports: console table, metrics files, summary."""

from lamelm_fast.metrics.logger import RunLogger, write_json_atomic

__all__ = ["RunLogger", "write_json_atomic"]
