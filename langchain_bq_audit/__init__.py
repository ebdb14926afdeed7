"""langchain-bq-audit: a complete, trustworthy audit log of LangChain runs in BigQuery."""

from .context import AuditContext, audit_context, disable, enable, global_handler
from .handler import BigQueryAuditHandler
from .registry import flush_all as flush
from .settings import AuditSettings

__all__ = [
    "AuditContext",
    "AuditSettings",
    "BigQueryAuditHandler",
    "__version__",
    "audit_context",
    "disable",
    "enable",
    "flush",
    "global_handler",
]
__version__ = "0.1.0"
