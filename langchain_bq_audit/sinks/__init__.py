"""Ways of writing rows to BigQuery, behind one small interface."""

from .base import PermanentError, RetryableError, Sink

__all__ = ["PermanentError", "RetryableError", "Sink"]
