"""The run record: what the handler hands to the writer, holding references only.

Building text, JSON and usage out of these references is `rows.py`'s job, on the writer
thread, so the callback path stays a few attribute stores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from uuid import UUID

if TYPE_CHECKING:
    from .settings import AuditSettings


def is_graph_bubble_up(error: BaseException) -> bool:
    """True for LangGraph's control-flow exceptions (`GraphBubbleUp`: `GraphInterrupt`,
    `ParentCommand`, ...), told by name so langgraph need not be imported."""
    return any(
        c.__name__ == "GraphBubbleUp" and c.__module__.startswith("langgraph")
        for c in type(error).__mro__
    )


class StreamClosed(GeneratorExit):
    """Why a run that ended while runs inside it were still running is `cancelled`: its
    output was cut off. langchain-core ends a sync stream its consumer closed early with
    `on_chain_end` of what it had (it swallows the `GeneratorExit`), before the runs inside
    it hear of the close."""


class RunRecord:
    """One run, filled in by start and end callbacks."""

    __slots__ = (
        "children",
        "configured",
        "context",
        "end_time",
        "error",
        "event_id",
        "first_token_time",
        "inputs",
        "invocation_params",
        "keep",
        "metadata",
        "name",
        "otel",
        "outputs",
        "owner",
        "parent_run_id",
        "run_id",
        "run_type",
        "sample_rate",
        "serialized",
        "session_id",
        "settings",
        "start_time",
        "status",
        "tags",
        "thread",
        "trace_id",
        "user_id",
    )

    def __init__(
        self,
        run_type: str,
        run_id: UUID,
        parent_run_id: UUID | None,
        trace_id: UUID,
        serialized: dict[str, Any] | None,
        inputs: Any,
        name: str | None,
        tags: list[str] | None,
        metadata: dict[str, Any] | None,
        invocation_params: dict[str, Any] | None,
        start_time: float,
    ) -> None:
        self.run_type = run_type
        self.run_id = run_id
        self.parent_run_id = parent_run_id
        self.trace_id = trace_id
        self.serialized = serialized
        self.inputs = inputs
        self.name = name
        self.tags = tags
        self.metadata = metadata
        self.invocation_params = invocation_params
        self.start_time = start_time
        self.first_token_time: float | None = None
        self.end_time: float | None = None
        self.outputs: Any = None
        self.error: BaseException | None = None
        self.event_id: str | None = None  # the row's id, given when it is first built or sent
        self.status = "ok"
        # Defaults from `audit_context` or the handler; metadata wins when rows are built.
        self.session_id: str | int | None = None
        self.user_id: str | int | None = None
        self.context: Any = None  # the `AuditContext` active at the run's start, if any
        # (session, user) named by the `configurable` of the run's config, if any
        self.configured: tuple[Any, Any] | None = None
        self.thread = 0  # the thread that started it: pairs ends when run ids repeat
        self.owner: Any = None  # the handler that saw the start; only it ends the run
        # that handler's row options (capture mode, redactors, sizes...): rows are built
        # with these, by whichever writer, without reaching back into the handler
        self.settings: AuditSettings | None = None
        # Volume settings: True writes the row; False never (a filter); None only if the run
        # fails (its trace was not sampled). `sample_rate` is written on the row.
        self.keep: bool | None = True
        self.sample_rate = 1.0
        # (trace id, span id) of the OpenTelemetry span current at the start, as ints, or
        # None; written as W3C hex (`otel_trace_id`, `otel_span_id`)
        self.otel: tuple[int, int] | None = None
        # run ids of its child runs started and not ended yet (None: none started); emptied
        # at its own end, so a record crosses to a writer process without them
        self.children: set[UUID] | None = None
