"""Rows that tell the truth (issue 16): outcome from what a run returned, repeated run ids,
session from `configurable`, numbers that stay numbers, media everywhere, and a tamper
check that agrees with itself. Every value is read back from the local BigQuery."""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import hashlib
import hmac
import math
import os
import subprocess
import sys
import threading
import uuid
from typing import Any, TypedDict

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.chat_history import InMemoryChatMessageHistory
from langchain_core.documents import Document
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import ConfigurableFieldSpec, RunnableLambda
from langchain_core.runnables.history import RunnableWithMessageHistory
from langchain_core.tools import ToolException, tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode
from langgraph.types import Command, interrupt
from pydantic import BaseModel

from langchain_bq_audit import audit_context
from langchain_bq_audit.integrity import verify
from langchain_bq_audit.reading import run_query
from langchain_bq_audit.settings import AuditSettings

from .conftest import query
from .models import ScriptedChatModel

DATASET = "language_model_logging"


def one(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, f"expected one row with {match}, got {len(found)}"
    return found[0]


def findings(bq_client: Any, table: str) -> list[str]:
    """What the project's `verify` finds in the table (as `bq-audit verify` reads it)."""
    rows = run_query(
        bq_client,
        f"SELECT * FROM `{bq_client.project}.{DATASET}.{table}` WHERE chain_id IS NOT NULL",
    )
    return [str(f) for f in verify(rows).findings]


def verify_cli(emulator: Any, table: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "langchain_bq_audit", "verify", "--endpoint", emulator.host_port,
         "--table", table],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


# -- 1. outcome from what the run returned ------------------------------------------------------


@tool
def find_order(order_id: str) -> str:
    """Find an order."""
    raise ToolException(f"order {order_id} not found")


find_order.handle_tool_error = True


class Refund(BaseModel):
    amount: int


@tool(args_schema=Refund)
def refund(amount: int) -> str:
    """Refund an amount."""
    return f"refunded {amount}"


refund.handle_validation_error = "amount must be a whole number"


def call(name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "args": args, "id": "call-1", "type": "tool_call"}


def test_a_handled_tool_error_is_an_error_row(make_handler, read_rows) -> None:
    handler = make_handler()
    config: Any = {"callbacks": [handler]}
    result = find_order.invoke(call("find_order", {"order_id": "A-1"}), config=config)
    assert isinstance(result, ToolMessage) and result.status == "error"
    bad = refund.invoke(call("refund", {"amount": "lots"}), config=config)
    assert bad.status == "error" and bad.content == "amount must be a whole number"
    assert refund.invoke(call("refund", {"amount": 5}), config=config).status == "success"
    assert handler.flush(timeout=60)

    rows = read_rows()
    found = one(rows, name="find_order")
    assert (found["status"], found["error_type"], found["error_message"], found["output_text"]) == (
        "error", "ToolMessage", "order A-1 not found", "")  # fmt: skip
    invalid = [r for r in rows if r["name"] == "refund" and r["status"] == "error"]
    assert [(r["error_type"], r["error_message"]) for r in invalid] == [
        ("ToolMessage", "amount must be a whole number")
    ]
    ok = one(rows, name="refund", status="ok")
    assert ok["error_type"] is None and ok["output_text"] == "refunded 5"


def test_a_tool_node_whose_calls_all_failed_is_an_error_row(make_handler, read_rows) -> None:
    @tool
    def lookup(order: str) -> str:
        """Look an order up."""
        raise ValueError(f"no order {order}")

    graph = StateGraph(MessagesState)
    graph.add_node("tools", ToolNode([lookup], handle_tool_errors=True))
    graph.add_edge(START, "tools")
    graph.add_edge("tools", END)
    handler = make_handler()
    asked = AIMessage("", tool_calls=[{"name": "lookup", "args": {"order": "A-1"}, "id": "c1"}])
    out = graph.compile().invoke({"messages": [asked]}, config={"callbacks": [handler]})
    assert out["messages"][-1].status == "error"
    assert handler.flush(timeout=60)

    rows = read_rows()
    message = "Error: ValueError('no order A-1')\n Please fix your mistakes."
    node = one(rows, name="tools")
    assert (node["status"], node["error_type"], node["error_message"]) == (
        "error", "ToolMessage", message)  # fmt: skip
    tool_row = one(rows, name="lookup")
    assert (tool_row["status"], tool_row["error_type"]) == ("error", "ValueError")
    graph_row = one(rows, name="LangGraph")  # the graph handled the error and went on
    assert graph_row["status"] == "ok"


class Ticket(TypedDict, total=False):
    question: str
    answer: str


def ask_human(state: Ticket) -> Ticket:
    return {"answer": interrupt({"question": "Approve refund?"})}


@pytest.mark.usefixtures("writer_makes_views")
def test_a_graph_paused_for_a_human_is_interrupted_not_failed(
    make_handler, read_rows, bq_client, table_name
) -> None:
    graph = StateGraph(Ticket)
    graph.add_node("ask_human", ask_human)
    graph.add_edge(START, "ask_human")
    graph.add_edge("ask_human", END)
    app = graph.compile(checkpointer=InMemorySaver())
    handler = make_handler()
    config: Any = {"callbacks": [handler], "configurable": {"thread_id": "ticket-9"}}

    paused = app.invoke({"question": "refund?"}, config=config)
    assert paused["__interrupt__"][0].value == {"question": "Approve refund?"}
    assert handler.flush(timeout=60)
    first = read_rows()
    assert {(r["name"], r["status"]) for r in first} == {
        ("LangGraph", "interrupted"), ("ask_human", "interrupted")}  # fmt: skip
    for row in first:
        assert row["error_type"] == "GraphInterrupt"
        assert row["error_message"] == '{"question":"Approve refund?"}'
        assert row["session_id"] == "ticket-9"

    assert app.invoke(Command(resume="yes"), config=config)["answer"] == "yes"
    assert handler.flush(timeout=60)
    resumed = [r for r in read_rows() if r["event_id"] not in {f["event_id"] for f in first}]
    assert {(r["name"], r["status"], r["error_type"]) for r in resumed} == {
        ("LangGraph", "ok", None), ("ask_human", "ok", None)}  # fmt: skip
    assert one(resumed, name="ask_human")["output_text"] == "yes"
    errors = query(
        bq_client, f"SELECT COUNT(*) AS n FROM `{bq_client.project}.{DATASET}.{table_name}_errors`"
    )
    assert errors == [{"n": 0}]  # the errors view stays empty


# -- 3. run ids are not assumed unique ---------------------------------------------------------


def test_four_threads_reusing_one_run_id_give_four_rows(make_handler, read_rows) -> None:
    handler = make_handler()
    together = threading.Barrier(4, timeout=60)

    def answer(q: str) -> str:
        together.wait()  # all four runs are pending at once
        return f"answer to {q}"

    chain = RunnableLambda(lambda d: d["q"]) | RunnableLambda(answer)
    shared = uuid.uuid4()

    def run(i: int) -> None:
        config: Any = {"callbacks": [handler], "run_id": shared,
                       "metadata": {"session_id": f"s-{i}"}}  # fmt: skip
        assert chain.invoke({"q": f"q{i}"}, config=config) == f"answer to q{i}"

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert handler.flush(timeout=60)

    rows = read_rows()
    roots = [r for r in rows if r["parent_run_id"] is None]
    assert len(roots) == 4 and {r["run_id"] for r in roots} == {str(shared)}
    # each root keeps its own start and its own end: session, input and output agree
    assert sorted((r["session_id"], r["input_text"], r["output_text"]) for r in roots) == [
        (f"s-{i}", f"q{i}", f"answer to q{i}") for i in range(4)
    ]
    assert len(rows) == 12 and len({r["event_id"] for r in rows}) == 12
    stats = handler.stats()
    assert stats["run_id_collisions"] == 3
    assert stats["written"] == 12 and stats["unmatched_ends"] == 0


def test_a_fixed_run_id_used_again_is_written_again(
    make_handler, read_rows, bq_client, table_name
) -> None:
    handler = make_handler()
    model = FakeListChatModel(responses=["one", "two"])
    for _ in range(2):
        model.invoke("hi", config={"callbacks": [handler], "run_id": uuid.UUID(int=7)})
    assert handler.flush(timeout=60)

    rows = read_rows()
    assert [r["output_text"] for r in rows] == ["one", "two"]
    assert {r["run_id"] for r in rows} == {str(uuid.UUID(int=7))}
    assert len({r["event_id"] for r in rows}) == 2
    assert all(uuid.UUID(r["event_id"]).version == 4 for r in rows)
    assert handler.stats()["run_id_collisions"] == 0  # not pending at the same time
    assert findings(bq_client, table_name) == []  # no "deleted rows"


# -- 4. session and user from configurable -----------------------------------------------------


def test_message_history_session_id_from_configurable(make_handler, read_rows) -> None:
    histories: dict[str, InMemoryChatMessageHistory] = {}
    prompt = ChatPromptTemplate.from_messages([MessagesPlaceholder("history"), ("human", "{q}")])
    chat = RunnableWithMessageHistory(
        prompt | FakeListChatModel(responses=["hello", "again"]),
        lambda session_id: histories.setdefault(session_id, InMemoryChatMessageHistory()),
        input_messages_key="q",
        history_messages_key="history",
    )
    handler = make_handler()
    config: Any = {"callbacks": [handler], "configurable": {"session_id": "foo"}}
    chat.invoke({"q": "hi"}, config=config)
    chat.invoke({"q": "hi again"}, config=config)
    assert len(histories["foo"].messages) == 4
    assert handler.flush(timeout=60)

    rows = read_rows()
    assert len(rows) >= 16
    assert {r["session_id"] for r in rows} == {"foo"}
    assert len([r for r in rows if r["name"] == "RunnableWithMessageHistory"]) == 2


def test_history_factory_config_keys_of_your_own_name_session_and_user(
    make_handler, read_rows
) -> None:
    """A history keyed by `chat_id` and `member` (its `history_factory_config`): those keys
    name session and user once `session_keys` / `user_keys` list them; without, neither is
    guessed."""
    histories: dict[tuple[str, str], InMemoryChatMessageHistory] = {}
    prompt = ChatPromptTemplate.from_messages([MessagesPlaceholder("history"), ("human", "{q}")])
    fields = [
        ConfigurableFieldSpec(id=key, annotation=str, name=key, default="", is_shared=True)
        for key in ("chat_id", "member")
    ]
    chat = RunnableWithMessageHistory(
        prompt | FakeListChatModel(responses=["hello"]),
        lambda chat_id, member: histories.setdefault(
            (chat_id, str(member)), InMemoryChatMessageHistory()
        ),
        input_messages_key="q",
        history_messages_key="history",
        history_factory_config=fields,
    )
    named = make_handler(session_keys="chat_id", user_keys=("member",))
    plain = make_handler()
    configurable = {"chat_id": "c-9", "member": 41}
    for handler, case in ((named, "named"), (plain, "plain")):
        config: Any = {"callbacks": [handler], "configurable": configurable,
                       "metadata": {"case": case}}  # fmt: skip
        chat.invoke({"q": "hi"}, config=config)
    assert len(histories[("c-9", "41")].messages) == 4
    assert named.flush(timeout=60) and plain.flush(timeout=60)

    rows = read_rows()
    assert len(rows) >= 16  # eight runs a call
    found = {(r["metadata"]["case"], r["session_id"], r["user_id"]) for r in rows}
    assert found == {("named", "c-9", "41"), ("plain", None, None)}


def test_session_and_user_keys_are_checked_at_construction() -> None:
    settings = AuditSettings.from_env({"BQ_AUDIT_SESSION_KEYS": "chat_id, thread_id"})
    assert settings.session_keys == ("chat_id", "thread_id", "session_id", "conversation_id")
    assert settings.user_keys == ("user_id", "user")
    assert AuditSettings(session_keys=" , ").session_keys == ("session_id", "thread_id",
                                                              "conversation_id")  # fmt: skip
    with pytest.raises(ValueError, match="session_keys must be names"):
        AuditSettings(session_keys=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="keys are names like chat_id"):
        AuditSettings(user_keys="a b")


def test_graph_thread_and_user_from_configurable_reach_every_row(make_handler, read_rows) -> None:
    model = FakeListChatModel(responses=["hi there"])
    graph = StateGraph(MessagesState)
    graph.add_node("chat", lambda state: {"messages": [model.invoke(state["messages"])]})
    graph.add_edge(START, "chat")
    graph.add_edge("chat", END)
    app = graph.compile(checkpointer=InMemorySaver())
    handler = make_handler(session_id="handler-default")
    config: Any = {"callbacks": [handler], "configurable": {"thread_id": "t-42", "user_id": 7}}
    with audit_context(session_id="block", user_id="block-user"):
        app.invoke({"messages": [("human", "hello")]}, config=config)
    assert handler.flush(timeout=60)

    rows = read_rows()
    assert {r["run_type"] for r in rows} == {"chain", "chat_model"}
    assert {(r["session_id"], r["user_id"]) for r in rows} == {("t-42", "7")}


def test_configurable_precedence_and_a_plain_chain(make_handler, read_rows) -> None:
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | FakeListChatModel(
        responses=["a", "b"]
    )
    handler = make_handler()
    configurable = {"conversation_id": "conv-1", "user": "ana"}
    with audit_context(session_id="block", user_id="block-user"):
        chain.invoke({"q": "x"}, config={"callbacks": [handler], "configurable": configurable,
                                         "metadata": {"case": "configurable"}})  # fmt: skip
        chain.invoke({"q": "y"}, config={"callbacks": [handler], "configurable": configurable,
                                         "metadata": {"case": "metadata",
                                                      "session_id": "meta"}})  # fmt: skip
    assert handler.flush(timeout=60)

    rows = read_rows()
    by_case = {(r["metadata"]["case"], r["name"]): (r["session_id"], r["user_id"]) for r in rows}
    # configurable beats audit_context, the run's metadata beats configurable; the root
    # (RunnableSequence) learns its configurable from its first child
    assert set(by_case.values()) == {("conv-1", "ana"), ("meta", "ana")}
    assert by_case[("configurable", "RunnableSequence")] == ("conv-1", "ana")
    assert by_case[("metadata", "FakeListChatModel")] == ("meta", "ana")


# -- 5. values keep their type -------------------------------------------------------------------


class Shelf(BaseRetriever):
    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        meta = {"score": np.float32(0.87), "rank": np.int64(1), "price": decimal.Decimal("19.90")}
        return [Document("a shelf", id="d1", metadata=meta)]


def test_numpy_and_decimal_values_stay_numbers(
    make_handler, read_rows, bq_client, table_name
) -> None:
    handler = make_handler()
    docs = Shelf().invoke("q", config={"callbacks": [handler], "metadata": {"batch": np.int64(7)}})
    assert len(docs) == 1
    lookup = RunnableLambda(lambda d: {"scores": np.array([0.5, 0.25]), "best": np.array(3)})
    lookup.invoke(
        {"exact": decimal.Decimal("0.1000000000000000000001"), "grid": np.eye(2, dtype=int)},
        config={"callbacks": [handler]},
    )
    assert handler.flush(timeout=60)

    rows = read_rows()
    retriever = one(rows, run_type="retriever")
    assert retriever["output_messages"] == [
        {"id": "d1", "metadata": {"score": 0.87, "rank": 1, "price": 19.9}}
    ]
    assert retriever["metadata"] == {"batch": 7, "ls_retriever_name": "shelf"}
    (cast,) = query(
        bq_client,
        "SELECT CAST(JSON_VALUE(metadata, '$.batch') AS INT64) AS batch, "
        "CAST(JSON_VALUE(output_messages[0].metadata.score) AS FLOAT64) AS score "
        f"FROM `{bq_client.project}.{DATASET}.{table_name}` WHERE run_type = 'retriever'",
    )
    assert cast == {"batch": 7, "score": 0.87}
    chain = one(rows, run_type="chain")
    assert chain["input_text"] == '{"exact":"0.1000000000000000000001","grid":[[1,0],[0,1]]}'
    assert chain["output_text"] == '{"scores":[0.5,0.25],"best":3}'


def test_usage_reported_as_zero_stays_zero(make_handler, read_rows) -> None:
    usage = {
        "input_tokens": 0,
        "output_tokens": 0,
        "total_tokens": 0,
        "input_token_details": {"cache_read": 0},
        "output_token_details": {"reasoning": 0},
    }
    handler = make_handler()
    ScriptedChatModel(message=AIMessage("", usage_metadata=usage)).invoke(
        "x", config={"callbacks": [handler]}
    )  # fmt: skip
    assert handler.flush(timeout=60)
    (row,) = read_rows()
    counts = ("prompt_tokens", "completion_tokens", "total_tokens", "cache_read_tokens",
              "reasoning_tokens")  # fmt: skip
    assert [row[c] for c in counts] == [0, 0, 0, 0, 0]
    assert row["token_usage_source"] == "provider"


@pytest.mark.parametrize("key", [None, "audit-key"])
def test_ids_given_as_ints_become_text_once(make_handler, read_rows, key) -> None:
    handler = make_handler(session_id=7, user_id_key=key)
    model = FakeListChatModel(responses=["a", "b"])
    with audit_context(user_id=12345):
        model.invoke("x", config={"callbacks": [handler]})
    model.invoke("y", config={"callbacks": [handler], "metadata": {"user_id": np.int64(12345)}})
    assert handler.flush(timeout=60)

    expected = "12345" if key is None else hmac.new(
        b"audit-key", b"12345", hashlib.sha256).hexdigest()  # fmt: skip
    assert [(r["session_id"], r["user_id"]) for r in read_rows()] == [("7", expected)] * 2


# -- 6. media by what it holds, text kept as text --------------------------------------------------

PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(29_992)  # 30,000 bytes
IMG = base64.b64encode(PNG).decode()  # 40,000 characters


def test_an_image_template_variable_is_a_placeholder_in_every_row(make_handler, read_rows) -> None:
    prompt = ChatPromptTemplate.from_messages(
        [("human", [{"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,{img}"}}])]
    )  # fmt: skip
    handler = make_handler()
    (prompt | FakeListChatModel(responses=["a chart"])).invoke(
        {"img": IMG}, config={"callbacks": [handler]}
    )
    assert handler.flush(timeout=60)

    rows = read_rows()
    assert len(rows) == 3 and not any(IMG[100:160] in str(r) for r in rows)
    names = ("RunnableSequence", "ChatPromptTemplate", "FakeListChatModel")
    sequence, template, model = (one(rows, name=n) for n in names)
    assert sequence["input_text"] == template["input_text"] == "<image/png 40000 bytes>"
    assert template["output_text"] == model["input_text"] == "user: What is this?\n[image_url]"
    assert model["input_messages"][0]["content"][1] == {
        "type": "image_url", "mime_type": "image/png", "bytes": 40_022}  # fmt: skip
    assert sequence["output_text"] == model["output_text"] == "a chart"


def test_media_in_tool_documents_and_metadata_and_long_text_in_other_parts(
    make_handler, read_rows
) -> None:
    @tool
    def describe(image: str, note: str) -> dict[str, Any]:
        """Describe an image."""
        return {"thumbnail": PNG[:2000], "note": note}

    handler = make_handler()
    data_url = f"data:image/png;base64,{IMG}"
    describe.invoke({"image": data_url, "note": "n"},
                    config={"callbacks": [handler], "metadata": {"upload": data_url}})  # fmt: skip
    thinking = "Let me think. " * 400  # 5,600 characters of text
    cited = "The refund policy says thirty days. " * 50
    answer = AIMessage(content=[
        {"type": "thinking", "thinking": thinking, "signature": "c2ln"},
        {"type": "text", "text": "Thirty days.",
         "citations": [{"type": "char_location", "cited_text": cited}]},
        {"type": "tool_use", "id": "t1", "name": "search", "input": {"query": thinking}},
    ])  # fmt: skip
    ScriptedChatModel(message=answer).invoke("policy?", config={"callbacks": [handler]})
    assert handler.flush(timeout=60)

    rows = read_rows()
    tool_row = one(rows, run_type="tool")
    assert tool_row["input_text"] == '{"image":"<image/png 40022 bytes>","note":"n"}'
    assert tool_row["output_text"] == '{"thumbnail":"<image/png 2000 bytes>","note":"n"}'
    assert tool_row["metadata"] == {"upload": "<image/png 40022 bytes>"}
    model_row = one(rows, run_type="chat_model")
    content = model_row["output_messages"][0]["content"]
    assert content[0] == {"type": "thinking", "thinking": thinking, "signature": "c2ln"}
    assert content[1]["citations"][0]["cited_text"] == cited
    assert content[2]["input"] == {"query": thinking}
    assert model_row["output_text"] == "[thinking]\nThirty days.\n[tool_use]"


# -- 7. the tamper check agrees with itself ------------------------------------------------------


def test_empty_messages_and_int_user_verify_clean(emulator, make_handler, table_name) -> None:
    handler = make_handler()
    FakeListChatModel(responses=["nothing"]).invoke([], config={"callbacks": [handler]})
    with audit_context(user_id=12345, metadata={"empty": {}, "none": [], "nan": math.nan}):
        RunnableLambda(lambda d: d).invoke({}, config={"callbacks": [handler]})
    assert handler.flush(timeout=60)
    done = verify_cli(emulator, table_name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 rows, ok" in done.stdout and "0 finding(s)" in done.stdout


ids = st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=12),
                st.sampled_from(["", "é", "\U0001f600", "\x00x"]))  # fmt: skip
leaves = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(["\u2028", "a\ud800b", "\\n", "data:,x"]),
    st.decimals(allow_nan=True), st.datetimes(timezones=st.just(dt.timezone.utc)),
)  # fmt: skip
json_values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def test_any_row_written_and_read_back_verifies(bq_client, make_handler, table_name) -> None:
    handler = make_handler(batch_age_s=0.2)
    model = FakeListChatModel(responses=["r"])
    echo = RunnableLambda(lambda v: v)
    count = 0

    slow = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]

    @settings(max_examples=60, deadline=None, suppress_health_check=slow)
    @given(value=json_values, meta=st.dictionaries(st.text(max_size=6), json_values, max_size=3),
           session=ids, user=ids, empty_chat=st.booleans())  # fmt: skip
    def run(value: Any, meta: dict[str, Any], session: Any, user: Any, empty_chat: bool) -> None:
        nonlocal count
        config: Any = {"callbacks": [handler], "metadata": meta}
        with audit_context(session_id=session, user_id=user):
            echo.invoke(value, config=config)
            model.invoke([] if empty_chat else "q", config=config)
        count += 2

    run()
    assert handler.flush(timeout=60)
    assert handler.stats()["written"] == count
    assert findings(bq_client, table_name) == []
