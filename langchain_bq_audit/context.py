"""Session, user, tags, metadata and trace context for runs: `audit_context()`,
`configured_identity()` and `otel_span_ids()`.

`audit_context` sets them for every run started inside a block, through a ContextVar, so
they follow asyncio tasks and threads started with a copied context; `configured_identity`
reads them from the `configurable` of LangChain's current runnable config; `otel_span_ids`
reads the current OpenTelemetry span. (The global switch, `enable()` and the launcher are
in `global_hook.py`.)
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

#: Where a run's session and user are named, first present wins, in its metadata and then
#: in its config's `configurable` (see `rows.resolve_session_user`).
SESSION_KEYS = ("session_id", "thread_id", "conversation_id")
USER_KEYS = ("user_id", "user")
_CONFIG_MODULE = "langchain_core.runnables.config"
_child_config: ContextVar[Any] | None = None
_OTEL_TRACE_MODULE = "opentelemetry.trace"
_current_span: Callable[[], Any] | None = None


def configured_identity(
    session_keys: Sequence[str] = SESSION_KEYS, user_keys: Sequence[str] = USER_KEYS
) -> tuple[Any, Any] | None:
    """(session, user) named in the `configurable` of the runnable config LangChain has set
    for the runs being started (its `var_child_runnable_config`), or None.

    Callbacks are not given the config: a run sees its parent's, which a nested run shares
    (`RunnableWithMessageHistory` and LangGraph pass `configurable` down). Cheap: a few dict
    lookups; langchain_core is not imported here (no runnable has run while it is not).
    The keys are looked up in order, first present wins (`AuditSettings.session_keys`).
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
    for key in session_keys:
        session = configurable.get(key)
        if session is not None and session != "":
            break
    for key in user_keys:
        user = configurable.get(key)
        if user is not None and user != "":
            break
    if session is None and user is None:
        return None
    return session, user


def otel_span_ids() -> tuple[int, int] | None:
    """(trace id, span id), as ints, of the OpenTelemetry span current in this context, or
    None when there is none, its context is invalid, or it is not sampled (its trace is
    recorded nowhere, so its ids would join nothing).

    OpenTelemetry is read only once the application has imported `opentelemetry.trace`
    itself: it is never imported here. Cheap (a dict lookup while it is not; with it, a
    ContextVar read and a few attribute reads, 1-3 us) and never raises.
    """
    global _current_span
    get = _current_span
    if get is None:
        module = sys.modules.get(_OTEL_TRACE_MODULE)
        # None while the application has not imported it, or while it is half imported
        get = getattr(module, "get_current_span", None)
        if get is None:
            return None
        _current_span = get
    try:
        context = get().get_span_context()
        if context.trace_flags.sampled and context.is_valid:
            return context.trace_id, context.span_id
    except Exception:  # an SDK or a span of an odd kind: the run is written without ids
        pass
    return None


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
