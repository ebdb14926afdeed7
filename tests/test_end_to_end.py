"""Callback -> writer -> real local BigQuery: the rows a user would query, with their values."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from langchain_core.language_models.fake import FakeListLLM
from langchain_core.language_models.fake_chat_models import (
    FakeListChatModel,
    GenericFakeChatModel,
    ParrotFakeChatModel,
)
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableConfig, RunnableLambda

from langchain_bq_audit import schema

PROMPT = ChatPromptTemplate.from_messages([("system", "Be brief."), ("human", "{question}")])


def answer(text: str, prompt_tokens: int, completion_tokens: int) -> AIMessage:
    return AIMessage(
        content=text,
        response_metadata={"model_name": "fake-model-7"},
        usage_metadata={
            "input_tokens": prompt_tokens,
            "output_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    )


def by_type(rows: list[dict[str, Any]], run_type: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["run_type"] == run_type]


def test_invoke_writes_one_row_per_run_with_values(make_handler, read_rows) -> None:
    handler = make_handler()
    model = GenericFakeChatModel(messages=iter([answer("Paris.", 12, 3)]))
    chain = PROMPT | model | StrOutputParser()
    config: RunnableConfig = {
        "callbacks": [handler],
        "tags": ["geo"],
        "metadata": {"session_id": "s-1", "user_id": "u-7"},
    }

    assert chain.invoke({"question": "Capital of France?"}, config=config) == "Paris."
    assert handler.flush(timeout=60)

    rows = read_rows()
    assert sorted(r["run_type"] for r in rows) == ["chain", "chain", "chain", "chat_model"]
    (root,) = [r for r in rows if r["parent_run_id"] is None]
    assert root["name"] == "RunnableSequence"
    assert root["input_text"] == "Capital of France?"
    assert root["output_text"] == "Paris."
    (model_row,) = by_type(rows, "chat_model")
    assert model_row["input_text"] == "system: Be brief.\nuser: Capital of France?"
    assert model_row["output_text"] == "Paris."
    assert model_row["input_messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
    ]
    assert (model_row["prompt_tokens"], model_row["completion_tokens"]) == (12, 3)
    assert model_row["total_tokens"] == 15
    assert model_row["token_usage_source"] == "provider"
    assert model_row["model_name"] == "fake-model-7"
    assert model_row["name"] == "GenericFakeChatModel"
    for row in rows:
        assert row["session_id"] == "s-1"
        assert row["user_id"] == "u-7"
        assert row["status"] == "ok"
        assert row["event_id"] != row["run_id"]  # a row's own id: run ids can repeat
        assert row["trace_id"] == root["run_id"]
        assert "geo" in row["tags"]
        assert row["latency_ms"] >= 0
        assert row["start_time"] <= row["timestamp"]
        assert row["metadata"]["session_id"] == "s-1"
        assert row["is_truncated"] is False
    assert set(rows[0]) == schema.COLUMN_NAMES


def test_batch_gives_one_trace_per_input(make_handler, read_rows) -> None:
    handler = make_handler()
    chain = PROMPT | ParrotFakeChatModel() | StrOutputParser()
    questions = [f"question {i}" for i in range(5)]

    outputs = chain.batch([{"question": q} for q in questions], config={"callbacks": [handler]})
    assert outputs == questions  # the parrot repeats the last message
    assert handler.flush(timeout=60)

    roots = read_rows("parent_run_id IS NULL")
    assert sorted(r["input_text"] for r in roots) == questions
    assert all(r["output_text"] == r["input_text"] for r in roots)
    assert len({r["trace_id"] for r in roots}) == 5
    models = read_rows("run_type = 'chat_model'")
    assert sorted(r["output_text"] for r in models) == questions
    assert all(r["token_usage_source"] == "missing" and r["total_tokens"] is None for r in models)


def test_stream_records_the_whole_answer_and_first_token(make_handler, read_rows) -> None:
    handler = make_handler()
    chain = PROMPT | FakeListChatModel(responses=["streamed answer"]) | StrOutputParser()

    chunks = list(chain.stream({"question": "go"}, config={"callbacks": [handler]}))
    assert "".join(chunks) == "streamed answer"
    assert len(chunks) > 1
    assert handler.flush(timeout=60)

    (model_row,) = read_rows("run_type = 'chat_model'")
    assert model_row["output_text"] == "streamed answer"
    assert model_row["time_to_first_token_ms"] is not None
    assert 0 <= model_row["time_to_first_token_ms"] <= model_row["latency_ms"]
    (root,) = read_rows("parent_run_id IS NULL")
    assert root["input_text"] == "go"
    assert root["output_text"] == "streamed answer"


class ProviderDown(Exception):
    pass


def test_failing_call_gives_error_rows_and_the_app_sees_its_own_error(
    make_handler, read_rows
) -> None:
    handler = make_handler()

    def broken(_: Any) -> str:
        raise ProviderDown("503 from the provider")

    chain = PROMPT | RunnableLambda(broken)
    with pytest.raises(ProviderDown, match="503 from the provider"):
        chain.invoke({"question": "hello?"}, config={"callbacks": [handler]})
    assert handler.flush(timeout=60)

    rows = read_rows("status = 'error'")
    assert sorted(r["name"] for r in rows) == ["RunnableSequence", "broken"]
    for row in rows:
        assert row["error_type"] == "ProviderDown"
        assert row["error_message"] == "503 from the provider"
        assert row["output_text"] == ""
    (prompt_row,) = read_rows("name = 'ChatPromptTemplate'")
    assert prompt_row["status"] == "ok"


def test_nested_chains_link_parent_and_trace_ids(make_handler, read_rows) -> None:
    handler = make_handler()
    inner = PROMPT | ParrotFakeChatModel() | StrOutputParser()

    def middle(text: str, config: RunnableConfig) -> str:
        return inner.invoke({"question": text}, config=config)

    outer = RunnableLambda(lambda x: x.upper()) | RunnableLambda(middle)
    assert outer.invoke("deep", config={"callbacks": [handler]}) == "DEEP"
    assert handler.flush(timeout=60)

    rows = read_rows()
    by_id = {r["run_id"]: r for r in rows}
    roots = [r for r in rows if r["parent_run_id"] is None]
    assert len(roots) == 1
    root = roots[0]
    depth = {}
    for row in rows:
        assert row["trace_id"] == root["run_id"]
        d, node = 0, row
        while node["parent_run_id"] is not None:
            node = by_id[node["parent_run_id"]]  # every parent is a row of its own
            d += 1
        depth[row["run_id"]] = d
    (model_row,) = by_type(rows, "chat_model")
    # outer sequence -> middle lambda -> inner sequence -> model
    assert depth[model_row["run_id"]] == 3
    assert by_id[model_row["parent_run_id"]]["name"] == "RunnableSequence"


def test_many_threads_give_every_row_once(make_handler, read_rows) -> None:
    handler = make_handler(batch_rows=64)
    model = FakeListChatModel(responses=["ok"])
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(50):
                meta = {"session_id": f"thread-{t}", "user_id": f"call-{i}"}
                model.invoke("hi", config={"callbacks": [handler], "metadata": meta})
        except BaseException as exc:  # pragma: no cover - would fail the test below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert handler.flush(timeout=60)

    rows = read_rows()
    assert len(rows) == 400
    assert len({r["event_id"] for r in rows}) == 400
    assert {(r["session_id"], r["user_id"]) for r in rows} == {
        (f"thread-{t}", f"call-{i}") for t in range(8) for i in range(50)
    }
    stats = handler.stats()
    assert stats["written"] == 400
    assert stats["spooled"] == stats["dropped"] == stats["dead_lettered"] == 0
    assert stats["pending_runs"] == 0


def test_plain_llm_rows_and_handler_defaults(make_handler, read_rows) -> None:
    handler = make_handler(app_name="billing-bot", environment="test")
    handler_defaults = make_handler(session_id="default-session", user_id="default-user")
    llm = FakeListLLM(responses=["forty-two"])

    assert llm.invoke("meaning?", config={"callbacks": [handler]}) == "forty-two"
    assert (
        llm.invoke(
            "again?", config={"callbacks": [handler_defaults], "metadata": {"user_id": "explicit"}}
        )
        == "forty-two"
    )
    assert handler.flush(timeout=60)

    first, second = read_rows()
    assert first["run_type"] == "llm"
    assert first["input_text"] == "meaning?"
    assert first["output_text"] == "forty-two"
    assert first["token_usage_source"] == "missing"
    assert first["prompt_tokens"] is None
    assert first["app_name"] == "billing-bot"
    assert first["environment"] == "test"
    assert first["session_id"] is None
    # metadata wins over the handler's default; the default fills what metadata lacks
    assert second["user_id"] == "explicit"
    assert second["session_id"] == "default-session"


def test_table_is_created_partitioned_and_clustered(make_handler, bq_client, table_name) -> None:
    handler = make_handler()
    FakeListLLM(responses=["x"]).invoke("y", config={"callbacks": [handler]})
    assert handler.flush(timeout=60)

    table = bq_client.get_table(f"{bq_client.project}.language_model_logging.{table_name}")
    assert [f.name for f in table.schema] == [c.name for c in schema.COLUMNS]
    assert [(f.field_type, f.mode) for f in table.schema][:3] == [
        ("TIMESTAMP", "REQUIRED"), ("STRING", "REQUIRED"), ("STRING", "REQUIRED"),
    ]  # fmt: skip
    assert table.time_partitioning.type_ == "DAY"
    assert table.time_partitioning.field == "timestamp"
    assert table.clustering_fields == list(schema.CLUSTERING_FIELDS)
    # the dataset's own settings: test_provision (a dataset this test alone makes; the shared
    # default one is made by whichever test of the worker comes first)


def test_strange_metadata_never_breaks_the_chain(make_handler, read_rows) -> None:
    handler = make_handler()
    cyclic: dict[str, Any] = {"session_id": "weird", "api_key": "sk-should-not-appear"}
    cyclic["self"] = cyclic
    cyclic["blob"] = b"\x00\xff" * 10
    cyclic["nan"] = float("nan")
    model = FakeListChatModel(responses=["fine"])

    reply = model.invoke("x", config={"callbacks": [handler], "metadata": cyclic})
    assert reply.content == "fine"
    assert handler.flush(timeout=60)

    (row,) = read_rows()
    assert row["output_text"] == "fine"
    assert row["session_id"] == "weird"
    assert row["metadata"]["api_key"] == "<removed>"
    assert "sk-should-not-appear" not in str(row)
    assert row["metadata"]["nan"] == "nan"
