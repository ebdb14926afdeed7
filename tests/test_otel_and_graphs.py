"""OpenTelemetry trace context and LangGraph agent attribution (issue 19), read back from the
local BigQuery: span ids on every row of a traced call (sync, async, batch, the writer
process), nothing imported without OpenTelemetry, the `_otel` view's GenAI names, node and
subgraph columns, and the `_nodes` view."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from typing import Any, TypedDict

import pytest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tools import tool
from langgraph.graph import END, START, StateGraph
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from langchain_bq_audit import BigQueryAuditHandler, otel_names

from .conftest import query, wait_for
from .models import ScriptedChatModel

DATASET = "language_model_logging"


def hex_ids(span: Any) -> tuple[str, str]:
    """The span's W3C ids as OTel exporters write them."""
    ctx = span.get_span_context()
    return trace.format_trace_id(ctx.trace_id), trace.format_span_id(ctx.span_id)


def model(*answers: tuple[str, int]) -> GenericFakeChatModel:
    """A chat model answering `text` and reporting `tokens` input tokens and 1 output token."""
    return GenericFakeChatModel(messages=iter(
        AIMessage(text, usage_metadata={"input_tokens": tokens, "output_tokens": 1,
                                        "total_tokens": tokens + 1})
        for text, tokens in answers
    ))  # fmt: skip


@pytest.fixture(scope="module")
def tracer() -> Any:
    """A real SDK tracer whose finished spans are kept in memory."""
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test")


@pytest.mark.parametrize("path", ["writer-thread", "writer-process", "spool"])
def test_rows_carry_the_span_active_at_their_start(
    emulator, bq_client, table_name, read_rows, tracer, tmp_path, path
) -> None:
    """Through each way a row travels: built by the writer thread; pickled to the writer
    process and built there; built, spooled while BigQuery is unreachable, then replayed."""
    spool = str(tmp_path / "spool")
    common: Any = {"table": table_name, "project": emulator.project, "spool_dir": spool,
                   "batch_age_s": 0.1}  # fmt: skip
    if path == "writer-thread":
        handler = BigQueryAuditHandler(client=bq_client, **common)
    elif path == "writer-process":
        handler = BigQueryAuditHandler(emulator_host=emulator.endpoint, writer_process=True,
                                       **common)  # fmt: skip
        wait_for(lambda: isinstance(handler.stats()["writer_process"], int), 60,
                 "the writer process to start")  # fmt: skip
    else:  # nothing listens on port 9: connection refused, then the spool
        handler = BigQueryAuditHandler(emulator_host="127.0.0.1:9", batch_deadline_s=1,
                                       request_timeout_s=1, **common)  # fmt: skip
    prompt = ChatPromptTemplate.from_messages([("human", "{q}")])
    chain = prompt | model(*[("a", 5)] * 6)
    cfg: Any = {"callbacks": [handler]}

    with tracer.start_as_current_span("sync") as sync_span:
        chain.invoke({"q": "sync"}, config={**cfg, "metadata": {"call": "sync"}})

    async def in_loop() -> None:
        with tracer.start_as_current_span("async") as span:
            spans["async"] = span
            await chain.ainvoke({"q": "async"}, config={**cfg, "metadata": {"call": "async"}})

    spans = {"sync": sync_span}
    asyncio.run(in_loop())
    with tracer.start_as_current_span("batch") as batch_span:  # runs in LangChain's threads
        chain.batch([{"q": "b1"}, {"q": "b2"}, {"q": "b3"}],
                    config={**cfg, "metadata": {"call": "batch"}})  # fmt: skip
    spans["batch"] = batch_span
    chain.invoke({"q": "none"}, config={**cfg, "metadata": {"call": "none"}})
    if path == "spool":
        wait_for(lambda: handler.stats()["spooled"] == 3 * 6, 60, "18 rows spooled")
        handler.close(timeout=5)
        replayer = BigQueryAuditHandler(client=bq_client, **common)
        wait_for(lambda: replayer.stats()["replayed"] == 3 * 6, 60, "the spool replayed")
        replayer.close()
    else:
        assert handler.flush(timeout=60)
        assert handler.stats()["callback_errors"] == 0
        handler.close()

    rows = read_rows()
    by_call: dict[str, set[tuple[Any, Any]]] = {}
    for row in rows:
        call = row["metadata"]["call"]
        by_call.setdefault(call, set()).add((row["otel_trace_id"], row["otel_span_id"]))
    # 3 runs a call (chain, prompt, model): every row of a traced call has its span's ids
    assert len(rows) == 3 * 6
    assert by_call == {
        "sync": {hex_ids(spans["sync"])},
        "async": {hex_ids(spans["async"])},
        "batch": {hex_ids(spans["batch"])},
        "none": {(None, None)},
    }


@pytest.mark.usefixtures("writer_makes_views")
def test_nothing_of_opentelemetry_is_imported_when_the_app_does_not_use_it(
    emulator, table_name
) -> None:
    """A process without OpenTelemetry runs, writes and provisions (views included) without
    asking for it; an import hook sees every attempt, even one caught as an ImportError
    (google-cloud-bigquery tries, for its own optional tracing)."""
    script = textwrap.dedent(f"""
        import sys

        class Watch:  # as if OpenTelemetry were not installed, noting who asks for it
            tried = []
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "opentelemetry":
                    frame = sys._getframe(1)
                    while frame.f_globals.get("__name__", "").startswith(
                            ("importlib", "_frozen_importlib")):
                        frame = frame.f_back
                    self.tried.append(frame.f_globals.get("__name__"))
                    raise ImportError("opentelemetry is not installed here")
                return None

        watch = Watch()
        sys.meta_path.insert(0, watch)
        from langchain_core.language_models.fake_chat_models import FakeListChatModel
        from langchain_bq_audit import BigQueryAuditHandler
        from langchain_bq_audit.reading import run_query
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import bigquery
        client = bigquery.Client(project="{emulator.project}", credentials=AnonymousCredentials(),
            client_options=ClientOptions(api_endpoint="http://{emulator.host_port}"))
        handler = BigQueryAuditHandler(client=client, table="{table_name}", batch_age_s=0.05)
        FakeListChatModel(responses=["hi"]).invoke("q", config={{"callbacks": [handler]}})
        assert handler.flush(timeout=60)
        rows = run_query(client, "SELECT trace_id, run_type FROM "
                         "`{emulator.project}.{DATASET}.{table_name}_otel`", {{}})
        ours = [m for m in watch.tried if m.startswith("langchain_bq_audit")]
        print(rows, ours, sorted(m for m in sys.modules if m.startswith("opentelemetry")))
        handler.close()
        """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[{'trace_id': None, 'run_type': 'chat_model'}] [] []"


class ProviderChatModel(ScriptedChatModel):
    """A chat model that names its provider as LangChain's provider packages do."""

    max_output_tokens: int | None = None  # Gemini's name for the cap on output tokens

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {**super()._identifying_params, "max_output_tokens": self.max_output_tokens}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "openai"
        return params


@pytest.mark.usefixtures("writer_makes_views")
def test_the_otel_view_speaks_the_genai_semantic_conventions(
    make_handler, bq_client, table_name, tracer
) -> None:
    handler = make_handler()
    usage = {"input_tokens": 12, "output_tokens": 3, "total_tokens": 15}
    answer = AIMessage("hello", usage_metadata=usage,
                       response_metadata={"model_name": "gpt-4o-2024-08-06"})  # fmt: skip
    chat = ProviderChatModel(message=answer, model="gpt-4o", temperature=0.2, max_output_tokens=256)

    @tool
    def lookup(city: str) -> str:
        """Look a city up."""
        return f"{city}: sunny"

    @tool
    def broken(city: str) -> str:
        """Always fails."""
        raise RuntimeError("no such city")

    with tracer.start_as_current_span("request") as span:
        chat.invoke("hi", config={"callbacks": [handler], "metadata": {"session_id": "s-9"}})
        lookup.invoke({"city": "Oslo"}, config={"callbacks": [handler]})
        with pytest.raises(RuntimeError):
            broken.invoke({"city": "Nowhere"}, config={"callbacks": [handler]})
    assert handler.flush(timeout=60)
    view = f"`{bq_client.project}.{DATASET}.{table_name}_otel`"
    names = otel_names
    rows = query(bq_client, f"""
        SELECT trace_id, span_id, run_type,
          gen_ai.operation.name AS op, gen_ai.provider.name AS provider,
          gen_ai.request.model AS request_model, gen_ai.response.model AS response_model,
          gen_ai.request.temperature AS temperature, gen_ai.request.max_tokens AS max_tokens,
          gen_ai.usage.input_tokens AS input_tokens, gen_ai.usage.output_tokens AS output_tokens,
          gen_ai.conversation.id AS conversation, gen_ai.tool.name AS tool, error.type AS error
        FROM {view} ORDER BY start_time""")  # fmt: skip
    ids = hex_ids(span)
    assert [tuple(r.values()) for r in rows] == [
        (*ids, "chat_model", names.GenAiOperationNameValues.CHAT,
         names.GenAiProviderNameValues.OPENAI, "gpt-4o", "gpt-4o-2024-08-06", 0.2, 256, 12, 3,
         "s-9", None, None),
        (*ids, "tool", names.GenAiOperationNameValues.EXECUTE_TOOL, None, None, None, None,
         None, None, None, None, "lookup", None),
        (*ids, "tool", names.GenAiOperationNameValues.EXECUTE_TOOL, None, None, None, None,
         None, None, None, None, "broken", "RuntimeError"),
    ]  # fmt: skip
    # the view's columns are the conventions' names, as paths of nested columns
    table = bq_client.get_table(f"{bq_client.project}.{DATASET}.{table_name}_otel")

    def paths(fields: Any, prefix: str = "") -> list[str]:
        out = []
        for f in fields:
            out += paths(f.fields, f"{prefix}{f.name}.") if f.fields else [prefix + f.name]
        return out

    assert {names.GEN_AI_OPERATION_NAME, names.GEN_AI_PROVIDER_NAME, names.GEN_AI_REQUEST_MODEL,
            names.GEN_AI_RESPONSE_MODEL, names.GEN_AI_USAGE_INPUT_TOKENS,
            names.GEN_AI_USAGE_OUTPUT_TOKENS, names.ERROR_TYPE, "trace_id",
            "span_id"} <= set(paths(table.schema))  # fmt: skip


# -- LangGraph -----------------------------------------------------------------------------------


class Doc(TypedDict):
    text: str


def research_agent() -> Any:
    """A subgraph (a sub-agent): search, then summarise, each calling a model."""
    searcher, summariser = model(("found", 40)), model(("summary", 30))

    def search(state: Doc) -> Doc:
        return {"text": str(searcher.invoke(state["text"]).content)}

    def summarise(state: Doc) -> Doc:
        return {"text": str(summariser.invoke(state["text"]).content)}

    sub = StateGraph(Doc)
    sub.add_node("search", search)
    sub.add_node("summarise", summarise)
    sub.add_edge(START, "search")
    sub.add_edge("search", "summarise")
    sub.add_edge("summarise", END)
    return sub.compile()


def supervisor_graph(fail_writer: bool = False) -> Any:
    """Two nodes calling models (planner, writer) and a node running the research subgraph."""
    planner, writer_model = model(("plan", 10)), model(("draft", 200))
    research = research_agent()

    def plan(state: Doc) -> Doc:
        return {"text": str(planner.invoke(state["text"]).content)}

    def run_research(state: Doc) -> Doc:
        return research.invoke(state)  # type: ignore[no-any-return]

    def write(state: Doc) -> Doc:
        text = str(writer_model.invoke(state["text"]).content)
        if fail_writer:
            raise ValueError("writer failed")
        return {"text": text}

    graph = StateGraph(Doc)
    graph.add_node("planner", plan)
    graph.add_node("research", run_research)
    graph.add_node("writer", write)
    graph.add_edge(START, "planner")
    graph.add_edge("planner", "research")
    graph.add_edge("research", "writer")
    graph.add_edge("writer", END)
    return graph.compile()


@pytest.mark.usefixtures("writer_makes_views")
def test_which_node_spent_the_tokens(make_handler, read_rows, bq_client, table_name) -> None:
    handler = make_handler()
    supervisor_graph().invoke({"text": "topic"}, config={"callbacks": [handler]})
    with pytest.raises(ValueError, match="writer failed"):
        supervisor_graph(fail_writer=True).invoke({"text": "topic"},
                                                  config={"callbacks": [handler]})  # fmt: skip
    assert handler.flush(timeout=60)
    rows = read_rows()
    base = f"{bq_client.project}.{DATASET}.{table_name}"

    # the answer to "which agent spent the tokens" is one GROUP BY on the new columns
    spent = query(bq_client, f"""
        SELECT langgraph_node, SUM(total_tokens) AS tokens, COUNTIF(status = 'error') AS errors
        FROM `{base}` WHERE langgraph_node IS NOT NULL
        GROUP BY langgraph_node ORDER BY tokens DESC""")  # fmt: skip
    assert [tuple(r.values()) for r in spent] == [
        ("writer", 2 * 201, 1 + 0), ("search", 2 * 41, 0), ("summarise", 2 * 31, 0),
        ("planner", 2 * 11, 0), ("research", None, 0),
    ]  # fmt: skip  # the failed writer node's row says error; its model call did not fail

    # a model call inside a subgraph names its node and the path of namespaces above it
    search_call = next(r for r in rows if r["run_type"] == "chat_model"
                       and r["langgraph_node"] == "search")  # fmt: skip
    parent_ns, child_ns = search_call["langgraph_checkpoint_ns"].split("|")
    assert parent_ns.startswith("research:") and child_ns.startswith("search:")
    assert search_call["langgraph_step"] == 1  # the subgraph's own first step
    meta = search_call["metadata"]
    assert (meta["langgraph_node"], meta["langgraph_checkpoint_ns"]) == (
        "search", search_call["langgraph_checkpoint_ns"])  # fmt: skip
    planner_call = next(r for r in rows if r["run_type"] == "chat_model"
                        and r["langgraph_node"] == "planner")  # fmt: skip
    assert (
        planner_call["langgraph_step"] == 1 and "|" not in planner_call["langgraph_checkpoint_ns"]
    )
    roots = [r for r in rows if r["parent_run_id"] is None]
    assert len(roots) == 2 and all(r["langgraph_node"] is None for r in roots)

    # the view: per node and subgraph path (task ids dropped), its executions, tokens, errors
    nodes = query(bq_client, f"""
        SELECT node_path, langgraph_node, executions, errors, failed_runs, calls, prompt_tokens,
          total_tokens, cost_usd, p50_latency_ms, p95_latency_ms
        FROM `{base}_nodes` ORDER BY node_path""")  # fmt: skip
    got = {r["node_path"]: r for r in nodes}
    assert sorted(got) == ["planner", "research", "research|search", "research|summarise",
                           "writer"]  # fmt: skip
    per_path = {
        p: (r["langgraph_node"], r["executions"], r["errors"], r["calls"], r["total_tokens"])
        for p, r in got.items()
    }
    assert per_path == {
        "planner": ("planner", 2, 0, 2, 22),
        "research": ("research", 2, 0, 0, None),
        "research|search": ("search", 2, 0, 2, 82),
        "research|summarise": ("summarise", 2, 0, 2, 62),
        "writer": ("writer", 2, 1, 2, 402),
    }
    assert got["writer"]["failed_runs"] == 1 and got["writer"]["prompt_tokens"] == 400
    for r in got.values():
        assert 0 < r["p50_latency_ms"] <= r["p95_latency_ms"]
        assert r["cost_usd"] is None  # fake models have no price
