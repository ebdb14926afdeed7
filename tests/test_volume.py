"""Shaping the volume: per-call opt-out, filters by run type and name, the user-visible mode
and head sampling per trace. Every check counts the rows in BigQuery."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any, TypedDict

import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda
from langchain_core.tools import ToolException, tool
from langgraph.graph import END, START, StateGraph

import langchain_bq_audit
from langchain_bq_audit.handler import SKIP_TAG
from langchain_bq_audit.settings import AuditSettings


@pytest.fixture(autouse=True)
def no_global_handler() -> Iterator[None]:
    yield
    langchain_bq_audit.disable()


def chain() -> Any:
    prompt = ChatPromptTemplate.from_messages([("human", "{q}")])
    return prompt | FakeListChatModel(responses=["ok"]) | StrOutputParser()


@tool
def lookup(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


def with_tool() -> Any:
    """A chain whose middle step (a lambda, an internal chain run) calls a tool."""
    return chain() | RunnableLambda(lambda text: lookup.invoke({"city": text}))


class State(TypedDict):
    text: str


def graph() -> Any:
    """Two nodes, each calling a chat model."""
    model = FakeListChatModel(responses=["a", "b"])

    def node(state: State) -> State:
        return {"text": state["text"] + str(model.invoke(state["text"]).content)}

    builder = StateGraph(State)
    builder.add_node("first", node)
    builder.add_node("second", node)
    builder.add_edge(START, "first")
    builder.add_edge("first", "second")
    builder.add_edge("second", END)
    return builder.compile()


def rows_of(handler: Any, read_rows: Any) -> list[dict[str, Any]]:
    assert handler.flush(timeout=60)
    stats = handler.stats()
    assert stats["unmatched_ends"] == stats["callback_errors"] == stats["pending_runs"] == 0
    return list(read_rows())


def test_default_writes_every_run(make_handler, read_rows) -> None:
    handler = make_handler()
    chain().invoke({"q": "x"}, config={"callbacks": [handler]})
    with_tool().invoke({"q": "x"}, config={"callbacks": [handler]})
    graph().invoke({"text": "x"}, config={"callbacks": [handler]})
    types = Counter(r["run_type"] for r in rows_of(handler, read_rows))
    # 4 for the chain, 6 for the chain with a tool, 5 for the graph (counted in the README)
    assert sum(types.values()) == 4 + 6 + 5
    assert types == {"chain": 3 + 4 + 3, "chat_model": 1 + 1 + 2, "tool": 1}


# README "Shaping the volume": rows for one call of each workload, per switch
VOLUME_TABLE = {
    "default": ({}, (4, 6, 5)),
    "tag": ({}, (0, 0, 0)),
    "run_types": ({"run_types": "chat_model,tool"}, (1, 2, 2)),
    "skip_names": ({"skip_names": "ChatPromptTemplate,StrOutputParser"}, (2, 4, 5)),
    "user_visible": ({"user_visible": True}, (2, 3, 3)),
}


@pytest.mark.parametrize("switch", list(VOLUME_TABLE))
def test_rows_per_call_with_each_switch_as_the_readme_says(
    switch: str, make_handler, read_rows
) -> None:
    options, expected = VOLUME_TABLE[switch]
    handler = make_handler(**options)
    tags = [SKIP_TAG] if switch == "tag" else []
    roots = [uuid.uuid4() for _ in range(3)]
    for root, workload, inputs in zip(
        roots, (chain, with_tool, graph), ({"q": "x"}, {"q": "x"}, {"text": "x"}), strict=True
    ):
        workload().invoke(inputs, config={"callbacks": [handler], "tags": tags, "run_id": root})
    # one more, so that the table exists and the flush has something to wait for
    chain().invoke({"q": "x"}, config={"callbacks": [make_handler()]})
    per_trace = Counter(r["trace_id"] for r in rows_of(handler, read_rows))
    assert tuple(per_trace[str(root)] for root in roots) == expected


def test_a_call_tagged_skip_is_not_written_nor_anything_inside_it(make_handler, read_rows) -> None:
    handler = make_handler()
    chain().invoke({"q": "skipped"}, config={"callbacks": [handler], "tags": [SKIP_TAG]})
    with_tool().invoke({"q": "skipped"}, config={"callbacks": [handler], "tags": [SKIP_TAG]})
    chain().invoke({"q": "kept"}, config={"callbacks": [handler]})
    rows = rows_of(handler, read_rows)
    assert len(rows) == 4 and {r["trace_id"] for r in rows} == {rows[0]["trace_id"]}
    assert "skipped" not in " ".join(r["input_text"] for r in rows)


def test_the_global_handler_honours_callbacks_empty(bq_client, table_name, read_rows) -> None:
    handler = langchain_bq_audit.enable(client=bq_client, table=table_name, batch_age_s=0.05)
    chain().invoke({"q": "not me"}, config={"callbacks": []})
    with_tool().invoke({"q": "not me"}, config={"callbacks": []})
    chain().invoke({"q": "me"})
    rows = rows_of(handler, read_rows)
    assert len(rows) == 4
    assert {r["input_text"] for r in rows if r["parent_run_id"] is None} == {"me"}


def test_run_types_and_skip_names(make_handler, read_rows) -> None:
    only_models = make_handler(run_types="chat_model,tool")
    with_tool().invoke({"q": "x"}, config={"callbacks": [only_models]})
    rows = rows_of(only_models, read_rows)
    assert sorted(r["run_type"] for r in rows) == ["chat_model", "tool"]
    only_models.close()

    # a second handler, same table: runs of this call are its own
    no_glue = make_handler(skip_names=["ChatPromptTemplate", "StrOutputParser"])
    chain().invoke({"q": "y"}, config={"callbacks": [no_glue]})
    rows = [r for r in rows_of(no_glue, read_rows) if r["run_type"] != "tool"]
    names = Counter(r["name"] for r in rows)
    assert names == {"RunnableSequence": 1, "FakeListChatModel": 2}  # 1 and 1 from before


def test_user_visible_keeps_model_tool_and_retriever_calls_and_the_root(
    make_handler, read_rows
) -> None:
    handler = make_handler(user_visible=True)
    with_tool().invoke({"q": "x"}, config={"callbacks": [handler]})
    graph().invoke({"text": "x"}, config={"callbacks": [handler]})
    rows = rows_of(handler, read_rows)
    got = sorted((r["run_type"], r["name"], r["parent_run_id"] is None) for r in rows)
    assert got == [
        ("chain", "LangGraph", True),
        ("chain", "RunnableSequence", True),
        ("chat_model", "FakeListChatModel", False),
        ("chat_model", "FakeListChatModel", False),
        ("chat_model", "FakeListChatModel", False),
        ("tool", "lookup", False),
    ]
    # the rows still name their real parents and trace
    for row in rows:
        if row["parent_run_id"] is not None:
            assert row["trace_id"] in {r["run_id"] for r in rows if r["parent_run_id"] is None}


def test_head_sampling_keeps_or_drops_whole_traces_by_their_id(make_handler, read_rows) -> None:
    handler = make_handler(sample_rate=0.5)
    roots = [uuid.uuid4() for _ in range(40)]
    for root in roots:
        chain().invoke({"q": "x"}, config={"callbacks": [handler], "run_id": root})
    rows = rows_of(handler, read_rows)
    expected = {str(r) for r in roots if r.int & ((1 << 48) - 1) < (1 << 47)}
    per_trace = Counter(r["trace_id"] for r in rows)
    assert set(per_trace) == expected and 0 < len(expected) < 40
    assert set(per_trace.values()) == {4}  # whole traces
    assert {r["sample_rate"] for r in rows} == {0.5}


def test_sampling_never_drops_a_failed_run(make_handler, read_rows) -> None:
    handler = make_handler(sample_rate=0.0)

    def fail(_: Any) -> None:
        raise RuntimeError("boom")

    failing = chain() | RunnableLambda(fail)
    for _ in range(3):
        chain().invoke({"q": "fine"}, config={"callbacks": [handler]})
        with pytest.raises(RuntimeError):
            failing.invoke({"q": "bad"}, config={"callbacks": [handler]})
    rows = rows_of(handler, read_rows)
    # per failing call: the lambda and the sequence failed; the ok steps are sampled out
    failed = [("RunnableSequence", "error"), ("fail", "error")]
    assert sorted((r["name"], r["status"]) for r in rows) == sorted(failed * 3)
    assert {r["sample_rate"] for r in rows} == {1.0}


def test_sampling_never_drops_an_error_returned_as_a_value(make_handler, read_rows) -> None:
    """A tool with `handle_tool_error` answers a tool call with `ToolMessage(status="error")`:
    its row says `error` (What a row holds), so sampling keeps it like a raised error."""
    handler = make_handler(sample_rate=0.0)

    @tool
    def find_order(order: str) -> str:
        """Look an order up."""
        raise ToolException(f"order {order} not found")

    find_order.handle_tool_error = True
    for i in range(3):
        call = {"type": "tool_call", "name": "find_order", "args": {"order": f"A-{i}"},
                "id": f"call-{i}"}  # fmt: skip
        assert find_order.invoke(call, config={"callbacks": [handler]}).status == "error"
    rows = rows_of(handler, read_rows)
    assert sorted((r["name"], r["status"], r["error_type"], r["sample_rate"]) for r in rows) == [
        ("find_order", "error", "ToolMessage", 1.0)] * 3  # fmt: skip


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"run_types": ("llm", "agent")}, "unknown run type(s) 'agent'"),
        ({"run_types": "chatmodel"}, "unknown run type(s) 'chatmodel'"),
        ({"sample_rate": 1.5}, "sample_rate must be between 0 and 1, got 1.5"),
        ({"sample_rate": -0.1}, "sample_rate must be between 0 and 1, got -0.1"),
        ({"sample_rate": float("nan")}, "sample_rate must be between 0 and 1, got nan"),
    ],
)
def test_bad_volume_options_are_a_clear_error_at_construction(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        AuditSettings(**options)


def test_volume_options_from_the_environment() -> None:
    env = {"BQ_AUDIT_RUN_TYPES": "llm, chat_model", "BQ_AUDIT_SKIP_NAMES": "A,B",
           "BQ_AUDIT_USER_VISIBLE": "true", "BQ_AUDIT_SAMPLE_RATE": "0.25"}  # fmt: skip
    settings = AuditSettings.from_env(env)
    assert settings.run_types == ("llm", "chat_model")
    assert settings.skip_names == ("A", "B")
    assert settings.user_visible is True and settings.sample_rate == 0.25
    with pytest.raises(ValueError, match="between 0 and 1"):
        AuditSettings.from_env({"BQ_AUDIT_SAMPLE_RATE": "2"})
