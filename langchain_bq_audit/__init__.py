"""langchain-bq-audit: a complete, trustworthy audit log of LangChain runs in BigQuery."""

from typing import TYPE_CHECKING, Any

from .context import AuditContext, audit_context
from .global_hook import disable, enable, global_handler
from .settings import AuditSettings

if TYPE_CHECKING:
    from .handler import BigQueryAuditHandler
    from .registry import flush_all as flush

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


def __getattr__(name: str) -> Any:
    # The handler and the writer import langchain_core (a few hundred ms cold): loaded on
    # first use, so that the start-up hooks (global_hook) cost nothing before LangChain does.
    if name == "BigQueryAuditHandler":
        from .handler import BigQueryAuditHandler

        return BigQueryAuditHandler
    if name == "flush":
        from .registry import flush_all

        return flush_all
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
