"""LangChain callbacks -> run records. Nothing here is slow, touches the network or raises.

Each start callback stores a `RunRecord` holding references to what LangChain passed; each
end callback stamps the end time and hands the record to the shared writer (an O(1) queue
append). Text, JSON and usage are built later, on the writer thread, by `rows.py`.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler

from .context import configured_identity, current_context, otel_span_ids
from .records import RunRecord, StreamClosed, is_graph_bubble_up
from .registry import get_writer
from .rows import returned_error, run_name
from .settings import AuditSettings

if TYPE_CHECKING:
    from google.cloud.bigquery import Client
    from langchain_core.messages import BaseMessage
    from langchain_core.outputs import ChatGenerationChunk, GenerationChunk, LLMResult

logger = logging.getLogger(__name__)
_MISSING = object()
SKIP_TAG = "bq-audit:skip"
"""A call with this tag (`config={"tags": [SKIP_TAG]}`) is not written, nor any run inside it."""
_SAMPLE_BITS = 48  # a trace is kept when the low bits of its id (random in uuid4 and uuid7)...
_SAMPLE_MASK = (1 << _SAMPLE_BITS) - 1  # ...fall below sample_rate * 2**48


def _hiding_code() -> Any:
    """The code object of the langchain-core callback path where being inline hides other
    handlers' events: `AsyncCallbackManager.on_llm_start` (langchain-ai/langchain#39633)
    sends the start of an async completion-LLM call only to the inline handlers when there
    are any."""
    from langchain_core.callbacks.manager import AsyncCallbackManager

    return AsyncCallbackManager.on_llm_start.__code__


_HIDING_CODE = _hiding_code()


class BigQueryAuditHandler(BaseCallbackHandler):
    """Writes one BigQuery row per finished LLM, chat model, chain, tool and retriever run.

    Example::

        handler = BigQueryAuditHandler()
        chain.invoke(x, config={"callbacks": [handler],
                                "metadata": {"session_id": "s-1", "user_id": "u-7"}})
        handler.flush(timeout=10)

    All handlers of one process that write to the same table (with the same client, or
    none) share one background writer and one set of pending runs: a run seen by several of
    them (a global and an explicit handler, say) gives one row. Handlers are cheap to make.
    """

    raise_error = False

    @property
    def run_inline(self) -> bool:  # type: ignore[override]  # an attribute in the base class
        """True (called in the caller's event loop, never through LangChain's thread pool),
        except when asked by the one langchain-core function where that would hide other
        handlers' events, and no other handler is inline there.

        In that function (see `_hiding_code`) our handler is then counted with the non-inline
        ones, which LangChain hands to `ahandle_event`, where it asks again and is called
        inline after all. When another handler is inline (LangSmith's tracer is), the others
        lose those starts anyway and saying True keeps ours. Plain `run_inline = False` would
        cost a thread pool hop per callback in async code (benchmarks `dispatch`). Python
        3.11 and older ask from the list comprehension's own frame.
        """
        frame = sys._getframe(1)
        if frame.f_code.co_name == "<listcomp>":
            frame = frame.f_back  # type: ignore[assignment]
        if frame.f_code is not _HIDING_CODE:  # identity: hashing a code object is slow
            return True
        handlers = getattr(frame.f_locals.get("self"), "handlers", ())
        return any(h.run_inline for h in handlers if not isinstance(h, BigQueryAuditHandler))

    def __init__(
        self,
        project: str | None = None,
        dataset: str | None = None,
        table: str | None = None,
        location: str | None = None,
        client: Client | None = None,
        *,
        session_id: str | int | None = None,
        user_id: str | int | None = None,
        settings: AuditSettings | None = None,
        **options: Any,
    ) -> None:
        """Create a handler.

        Args:
            project, dataset, table, location: the destination; `None` takes the setting
                (`BQ_AUDIT_*` environment variables, then defaults).
            client: a ready `google.cloud.bigquery.Client` (any endpoint) to write with.
            session_id, user_id: defaults for runs whose metadata names none.
            settings: a complete `AuditSettings`; the other arguments override it.
            **options: any other `AuditSettings` field, e.g. `batch_rows=100`.
        """
        overrides: dict[str, Any] = dict(
            project=project, dataset=dataset, table=table, location=location
        )
        overrides.update(options)
        if settings is None:
            settings = AuditSettings.from_env(**overrides)
        else:
            settings = settings.replace(**{k: v for k, v in overrides.items() if v is not None})
        self.settings = settings
        self._writer = get_writer(settings, client)
        self._submit: Callable[[RunRecord], None] = self._writer.submit
        tracker = self._writer.tracker
        self._tracker = tracker
        self._runs = tracker.runs  # shared by every handler of this table
        self._max_pending = tracker.max_pending
        self._skipped: dict[UUID, None] = {}  # runs seen here that another handler owns
        self._session_id = session_id
        self._user_id = user_id
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(("callback_errors", "untracked_runs", "unmatched_ends"), 0)
        self._shaped = bool(settings.run_types or settings.skip_names or settings.user_visible
                            or settings.sample_rate < 1.0)  # fmt: skip
        self._sample_below = int(settings.sample_rate * (1 << _SAMPLE_BITS))
        self._writer.ensure_started()  # also replays what an earlier process left spooled

    # -- public ---------------------------------------------------------------------------

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until every row accepted so far is written. False on timeout or failure."""
        return self._writer.flush(timeout)

    def close(self, timeout: float | None = 10.0) -> bool:
        """Flush and stop the shared writer for this table (it restarts if used again)."""
        return self._writer.close(timeout)

    def stats(self) -> dict[str, Any]:
        """Counters of this handler and of its table's writer and pending runs."""
        out = self._writer.stats()
        out.update(self._counts)
        out["pending_runs"] = len(self._runs)
        out["abandoned"] = self._tracker.abandoned
        out["run_id_collisions"] = self._tracker.run_id_collisions
        return out

    # -- run tracking (hot path) --------------------------------------------------------------

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def _start(
        self,
        run_type: str,
        serialized: dict[str, Any] | None,
        inputs: Any,
        run_id: UUID,
        parent_run_id: UUID | None,
        tags: list[str] | None,
        metadata: dict[str, Any] | None,
        kwargs: dict[str, Any],
    ) -> None:
        runs = self._runs
        seen = runs.get(run_id)
        # The same start dispatched to another handler of this table (or to this one twice)
        # carries the very same metadata object: that run is the first handler's row. A
        # start with other metadata is another run that reuses the id (`repeat` below). A
        # call tagged SKIP_TAG is not written (LangChain passes a call's tags to its runs).
        if (seen is not None and seen.metadata is metadata) or (tags and SKIP_TAG in tags):
            skipped = self._skipped
            if len(skipped) >= self._max_pending:  # ends that never come must not pile up
                skipped.clear()
            skipped[run_id] = None
            return
        if len(runs) >= self._max_pending:
            self._count("untracked_runs")
            return
        trace_id = run_id
        if parent_run_id is not None:
            parent = runs.get(parent_run_id)
            if parent is not None:
                trace_id = parent.trace_id
                # read once: the parent may be ending in another thread (its set is let go)
                children = parent.children
                if children is None:  # a race here loses a child: only a false "ok"
                    parent.children = {run_id}
                else:
                    children.add(run_id)
            else:
                trace_id = parent_run_id
        # A shallow copy of a dict input guards against the caller mutating it before the
        # writer thread reads it; it costs about 100 ns.
        if type(inputs) is dict:
            inputs = inputs.copy()
        rec = RunRecord(
            run_type,
            run_id,
            parent_run_id,
            trace_id,
            serialized,
            inputs,
            kwargs.get("name"),
            tags,
            metadata,
            kwargs.get("invocation_params"),
            time.time(),
        )
        rec.thread = threading.get_ident()
        rec.otel = otel_span_ids()  # read now: the span current when the run starts
        configured = configured_identity(self.settings.session_keys, self.settings.user_keys)
        if configured is not None:
            rec.configured = configured
            # A run's config reaches callbacks only through the runs inside it: the first
            # one to see it tells its pending ancestors (a root sees no config of its own,
            # nor does a LangGraph node). Later children stop at their informed parent.
            parent = runs.get(parent_run_id) if parent_run_id is not None else None
            while parent is not None and parent.configured is None:
                parent.configured = configured
                parent = runs.get(parent.parent_run_id) if parent.parent_run_id else None
        ctx = current_context.get()
        if ctx is None:
            rec.session_id = self._session_id
            rec.user_id = self._user_id
        else:
            rec.context = ctx
            rec.session_id = ctx.session_id or self._session_id
            rec.user_id = ctx.user_id or self._user_id
        rec.owner = self
        rec.settings = self.settings
        if self._shaped:
            self._shape(rec)
        if seen is not None:  # a run id already pending: tracked as a run of its own
            self._tracker.add_repeat(rec)
        else:
            runs[run_id] = rec

    def _shape(self, rec: RunRecord) -> None:
        """Apply the volume settings: whether the run's row is written, at what sample rate.

        The record is tracked either way: its children need its trace id.
        """
        settings = self.settings
        if (
            (settings.run_types and rec.run_type not in settings.run_types)
            or (settings.skip_names and run_name(rec) in settings.skip_names)
            or (settings.user_visible and rec.run_type == "chain" and rec.parent_run_id)
        ):
            rec.keep = False
        elif self._sample_below < 1 << _SAMPLE_BITS:
            rec.sample_rate = settings.sample_rate
            if rec.trace_id.int & _SAMPLE_MASK >= self._sample_below:
                rec.keep = None  # written only if it fails

    def _end(self, run_id: UUID, outputs: Any, error: BaseException | None, kwargs: Any) -> None:
        key: Any = run_id
        shared = False  # another pending run has this id: whose children are whose is unknown
        if self._tracker.repeats and run_id in self._tracker.repeats:
            shared = True
            key = self._tracker.key_to_end(run_id, threading.get_ident())
        rec = self._runs.get(key)
        if rec is None or rec.owner is not self:
            if self._skipped.pop(run_id, _MISSING) is _MISSING:
                self._count("unmatched_ends")  # no start seen, a second end, or swept
            return  # else: the run is another handler's to end
        if self._runs.pop(key, None) is None:  # swept as abandoned a moment ago
            self._count("unmatched_ends")
            return
        rec.end_time = time.time()
        rec.outputs = outputs.copy() if type(outputs) is dict else outputs
        late_inputs = kwargs.get("inputs")
        if late_inputs is not None:  # streamed chains only know their input at the end
            rec.inputs = late_inputs
        parent = self._runs.get(rec.parent_run_id) if rec.parent_run_id is not None else None
        siblings = parent.children if parent is not None else None  # read once (threads)
        if siblings:
            siblings.discard(run_id)
        keep = rec.keep
        # a run inside a closed stream ends after it, as if it had finished (a parser with
        # the part it had): marked when the run above it was found cut off
        cut = rec.error if error is None and isinstance(rec.error, StreamClosed) else None
        children, rec.children = rec.children, None
        if children is not None and error is None and not shared:
            # a copy first: another thread may start a run inside it meanwhile
            running = [r for r in map(self._runs.get, list(children)) if r is not None]
            if running:  # cut off: a sync stream closed by its consumer
                cut = StreamClosed(
                    f"ended while {len(running)} run(s) inside it were still running: "
                    "its output is what it had when cut off"
                )
                inside = StreamClosed(
                    "the stream it ran in was closed: its output is what it had when cut off"
                )
                for child in running:
                    if child.error is None:
                        child.error = inside
        if cut is not None:
            rec.status = "error"
            rec.error = cut
            rec.sample_rate = 1.0
            keep = keep is not False
        if error is not None:
            rec.status = "error"
            rec.error = error
            rec.sample_rate = 1.0  # written whatever the sampling, so it counts once
            keep = keep is not False
            if is_graph_bubble_up(error) and type(error).__name__ != "ParentCommand":
                self._pause_graph(rec, error)
            for child in self._tracker.end_descendants(rec, rec.end_time):  # rare: errors only
                if child.keep is not False:  # cut off: written like a failed run
                    child.sample_rate = 1.0
                    self._submit(child)
        elif keep is None and returned_error(rec.outputs) is not None:
            rec.sample_rate = 1.0  # an error returned as a value (its row says error)
            keep = True
        if keep:  # else left out by a volume setting
            self._submit(rec)

    def _pause_graph(self, rec: RunRecord, interrupt: BaseException) -> None:
        """An interrupt pauses the whole graph, though LangGraph ends its root run as if it
        had finished: mark the pending runs of the graph above `rec` (their metadata says
        `ls_integration: langgraph`) so their rows say `interrupted` with its value."""
        runs = self._runs
        parent = runs.get(rec.parent_run_id) if rec.parent_run_id is not None else None
        while parent is not None and (parent.metadata or {}).get("ls_integration") == "langgraph":
            if parent.error is None:
                parent.error = interrupt  # the status stays ok unless it fails itself
            parent = runs.get(parent.parent_run_id) if parent.parent_run_id else None

    # -- LangChain callbacks ------------------------------------------------------------------
    # Every callback catches everything: an audit log must never break the audited app.

    def on_llm_start(
        self,
        serialized: dict[str, Any],
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            self._start("llm", serialized, prompts, run_id, parent_run_id, tags, metadata, kwargs)
        except Exception:
            self._on_callback_error("on_llm_start")

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            self._start(
                "chat_model", serialized, messages, run_id, parent_run_id, tags, metadata, kwargs
            )
        except Exception:
            self._on_callback_error("on_chat_model_start")

    def on_llm_new_token(
        self,
        token: str | list[str | dict[str, Any]],
        *,
        chunk: GenerationChunk | ChatGenerationChunk | None = None,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            rec = self._runs.get(run_id)
            if rec is not None and rec.first_token_time is None:
                rec.first_token_time = time.time()
        except Exception:
            self._on_callback_error("on_llm_new_token")

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        try:
            self._end(run_id, response, None, kwargs)
        except Exception:
            self._on_callback_error("on_llm_end")

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        try:
            self._end(run_id, kwargs.get("response"), error, kwargs)
        except Exception:
            self._on_callback_error("on_llm_error")

    def on_chain_start(
        self,
        serialized: dict[str, Any],
        inputs: dict[str, Any],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            self._start("chain", serialized, inputs, run_id, parent_run_id, tags, metadata, kwargs)
        except Exception:
            self._on_callback_error("on_chain_start")

    def on_chain_end(self, outputs: dict[str, Any], *, run_id: UUID, **kwargs: Any) -> None:
        try:
            self._end(run_id, outputs, None, kwargs)
        except Exception:
            self._on_callback_error("on_chain_end")

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        try:
            self._end(run_id, None, error, kwargs)
        except Exception:
            self._on_callback_error("on_chain_error")

    def on_tool_start(
        self,
        serialized: dict[str, Any],
        input_str: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        inputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            value = inputs if inputs is not None else input_str
            self._start("tool", serialized, value, run_id, parent_run_id, tags, metadata, kwargs)
        except Exception:
            self._on_callback_error("on_tool_start")

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        try:
            self._end(run_id, output, None, {})
        except Exception:
            self._on_callback_error("on_tool_end")

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        try:
            self._end(run_id, None, error, {})
        except Exception:
            self._on_callback_error("on_tool_error")

    def on_retriever_start(
        self,
        serialized: dict[str, Any],
        query: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            self._start(
                "retriever", serialized, query, run_id, parent_run_id, tags, metadata, kwargs
            )
        except Exception:
            self._on_callback_error("on_retriever_start")

    def on_retriever_end(self, documents: Sequence[Any], *, run_id: UUID, **kwargs: Any) -> None:
        try:
            self._end(run_id, documents, None, {})
        except Exception:
            self._on_callback_error("on_retriever_end")

    def on_retriever_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        try:
            self._end(run_id, None, error, {})
        except Exception:
            self._on_callback_error("on_retriever_error")

    def _on_callback_error(self, where: str) -> None:
        try:
            self._count("callback_errors")
            logger.debug("langchain-bq-audit: error in %s", where, exc_info=True)
        except Exception:  # pragma: no cover - logging itself failed; nothing else to do
            pass
