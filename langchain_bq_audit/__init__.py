"""langchain-bq-audit: a complete, trustworthy audit log of LangChain runs in BigQuery."""

from .handler import BigQueryAuditHandler
from .settings import AuditSettings

__all__ = ["AuditSettings", "BigQueryAuditHandler", "__version__"]
__version__ = "0.1.0"
