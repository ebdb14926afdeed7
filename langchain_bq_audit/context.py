"""Attach the audit log without touching each call: the global hook, `enable()`, `audit_context()`.

- `LANGCHAIN_BQ_AUDIT=true` (read on every LangChain configure call, so it can be set after
  import) or `enable(**options)` adds one process-wide `BigQueryAuditHandler` to every run,
  through `langchain_core.tracers.context.register_configure_hook`, registered once: at
  import when LangChain has loaded that module, else the moment it does.
- `audit_context(session_id=..., user_id=..., tags=..., metadata=...)` sets session, user,
  tags and metadata for every run started inside it, through a ContextVar, so it follows
  asyncio tasks and threads started with a copied context.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from .settings import TRUE_WORDS

if TYPE_CHECKING:
    from .handler import BigQueryAuditHandler

ENV_VAR = "LANGCHAIN_BQ_AUDIT"
logger = logging.getLogger(__name__)
#: Where a run's session and user are named, first present wins, in its metadata and then
#: in its config's `configurable` (see `rows.resolve_session_user`).
SESSION_KEYS = ("session_id", "thread_id", "conversation_id")
USER_KEYS = ("user_id", "user")
_CONFIG_MODULE = "langchain_core.runnables.config"
_child_config: ContextVar[Any] | None = None


def configured_identity() -> tuple[Any, Any] | None:
    """(session, user) named in the `configurable` of the runnable config LangChain has set
    for the runs being started (its `var_child_runnable_config`), or None.

    Callbacks are not given the config: a run sees its parent's, which a nested run shares
    (`RunnableWithMessageHistory` and LangGraph pass `configurable` down). Cheap: a few dict
    lookups; langchain_core is not imported here (no runnable has run while it is not).
    """
    global _child_config
    var = _child_config
    if var is None:
        module = sys.modules.get(_CONFIG_MODULE)
        if module is None:
            return None
        var = _child_config = module.var_child_runnable_config
    config = var.get()
    if not config:
        return None
    configurable = config.get("configurable")
    if not configurable:
        return None
    session = user = None
    for key in SESSION_KEYS:
        session = configurable.get(key)
        if session is not None and session != "":
            break
    for key in USER_KEYS:
        user = configurable.get(key)
        if user is not None and user != "":
            break
    if session is None and user is None:
        return None
    return session, user


@dataclass(frozen=True)
class AuditContext:
    """Session, user, tags and metadata for the runs started inside an `audit_context`."""

    session_id: str | int | None = None
    user_id: str | int | None = None
    tags: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)


current_context: ContextVar[AuditContext | None] = ContextVar(
    "langchain_bq_audit_context", default=None
)


@contextlib.contextmanager
def audit_context(
    session_id: str | int | None = None,
    user_id: str | int | None = None,
    tags: Sequence[str] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Iterator[AuditContext]:
    """Set session, user, tags and metadata for every run started inside the block.

    Precedence for session and user: the run's own metadata, then its config's
    `configurable`, then the innermost `audit_context`, then the handler's `session_id=` /
    `user_id=`; ids given as ints are written as their digits. Tags add up and
    metadata merges (inner wins; the run's own metadata wins over both). Example::

        with audit_context(session_id="s-1", user_id="u-7"):
            chain.invoke(question)          # every row of this call has s-1 and u-7
    """
    outer = current_context.get() or AuditContext()
    ctx = AuditContext(
        session_id=session_id if session_id is not None else outer.session_id,
        user_id=user_id if user_id is not None else outer.user_id,
        tags=outer.tags + tuple(t for t in (tags or ()) if t not in outer.tags),
        metadata={**outer.metadata, **(metadata or {})},
    )
    token = current_context.set(ctx)
    try:
        yield ctx
    finally:
        current_context.reset(token)


class _GlobalHandler:
    """What LangChain's configure hook reads: it only ever calls `.get()`.

    A real ContextVar would hold a value per thread and per task; a global audit log has
    to reach every thread and event loop of the process, so this object stands in for one.
    """

    def __init__(self) -> None:
        self.handler: BigQueryAuditHandler | None = None
        self.state = "env"  # "env": follow LANGCHAIN_BQ_AUDIT; "on": enable(); "off": disable()
        self.lock = threading.Lock()
        self.env_error: str | None = None

    def get(self) -> BigQueryAuditHandler | None:
        if self.state == "on":
            return self.handler
        if self.state == "off" or os.environ.get(ENV_VAR, "").strip().lower() not in TRUE_WORDS:
            return None
        return self.handler or self._from_env()

    def _from_env(self) -> BigQueryAuditHandler | None:
        with self.lock:
            if self.handler is None and self.env_error is None:
                from .handler import BigQueryAuditHandler

                try:
                    self.handler = BigQueryAuditHandler()  # settings from BQ_AUDIT_* variables
                except Exception as exc:  # bad settings must not break every chain: say it once
                    self.env_error = f"{type(exc).__name__}: {exc}"
                    logger.warning(
                        "langchain-bq-audit: %s is set but auditing is off: %s",
                        ENV_VAR, self.env_error,
                    )  # fmt: skip
            return self.handler


_global = _GlobalHandler()
_TRACERS_CONTEXT = "langchain_core.tracers.context"


def _register() -> None:
    from langchain_core.tracers.context import register_configure_hook

    register_configure_hook(cast("ContextVar[Any]", _global), inheritable=True)


class _RegisterWhenImported:
    """Registers the hook right after LangChain imports `langchain_core.tracers.context`.

    A meta path finder needs only `find_spec` (not `importlib.abc`, which costs 8 ms).

    That module imports langsmith (about a second); LangChain imports it itself on the
    first run it configures, so waiting for that keeps `import langchain_bq_audit` fast.
    """

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _TRACERS_CONTEXT:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


if _TRACERS_CONTEXT in sys.modules:
    _register()
else:
    sys.meta_path.insert(0, _RegisterWhenImported())


def enable(**options: Any) -> BigQueryAuditHandler:
    """Audit every LangChain run in this process; returns the global handler.

    `options` are `BigQueryAuditHandler`'s arguments (`table=`, `client=`, `session_id=`,
    any `AuditSettings` field); the rest come from `BQ_AUDIT_*` variables. Calling it again
    replaces the global handler. Example::

        langchain_bq_audit.enable(app_name="support-bot")
        chain.invoke(question)              # audited, no callbacks= needed
    """
    from .handler import BigQueryAuditHandler

    handler = BigQueryAuditHandler(**options)
    with _global.lock:
        _global.handler = handler
        _global.state = "on"
    return handler


def disable() -> None:
    """Stop auditing runs globally (also overrides `LANGCHAIN_BQ_AUDIT`).

    Rows already accepted are still written; explicit handlers keep working.
    """
    with _global.lock:
        _global.handler = None
        _global.state = "off"


def global_handler() -> BigQueryAuditHandler | None:
    """The handler attached to every run (by `enable()` or the environment), or None."""
    return _global.get()
