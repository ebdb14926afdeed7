"""Every column right for every shape LangChain hands us, read back from the local BigQuery."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import decimal
import threading
import uuid
from typing import Any

import pytest
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.language_models.fake_chat_models import (
    FakeListChatModel,
    GenericFakeChatModel,
)
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnableLambda
from langchain_core.tools import tool
from pydantic import BaseModel

from langchain_bq_audit.rows import content_parts

from .conftest import wait_for
from .models import ScriptedChatModel, UsageLLM

PNG_B64 = "iVBORw0KGgo" + "A" * 5000


def one(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, f"expected one row with {match}, got {len(found)}"
    return found[0]


# -- run types --------------------------------------------------------------------------------


@tool
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


@tool
def explode(text: str) -> str:
    """Always fails."""
    raise RuntimeError(f"cannot handle {text}")


def test_tool_rows(make_handler, read_rows) -> None:
    handler = make_handler()
    assert add.invoke({"a": 2, "b": 3}, config={"callbacks": [handler]}) == 5
    with pytest.raises(RuntimeError):
        explode.invoke({"text": "boom"}, config={"callbacks": [handler]})
    assert handler.flush(timeout=60)

    rows = read_rows()
    ok = one(rows, name="add")
    assert ok["run_type"] == "tool"
    assert ok["input_text"] == '{"a":2,"b":3}'
    assert ok["output_text"] == "5"
    assert ok["status"] == "ok"
    failed = one(rows, name="explode")
    assert failed["status"] == "error"
    assert failed["error_type"] == "RuntimeError"
    assert failed["error_message"] == "cannot handle boom"


class Shelf(BaseRetriever):
    """A real retriever over two documents."""

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        return [
            Document(id="doc-1", page_content="secret body one", metadata={"source": "a.md"}),
            Document(id="doc-2", page_content="secret body two", metadata={"page": 3}),
        ]


@pytest.mark.parametrize("capture", [False, True])
def test_retriever_rows_keep_ids_and_metadata(make_handler, read_rows, capture: bool) -> None:
    handler = make_handler(capture_documents=capture)
    chain = Shelf() | RunnableLambda(lambda docs: len(docs))
    assert chain.invoke("where is it?", config={"callbacks": [handler]}) == 2
    assert handler.flush(timeout=60)

    row = one(read_rows(), run_type="retriever")
    assert row["name"] == "Shelf"
    assert row["input_text"] == "where is it?"
    assert row["output_text"] == "2 documents"
    assert [d["id"] for d in row["output_messages"]] == ["doc-1", "doc-2"]
    assert row["output_messages"][0]["metadata"] == {"source": "a.md"}
    assert ("secret body one" in str(row)) is capture
    assert row["parent_run_id"] is not None
    assert row["trace_id"] == row["parent_run_id"]


def test_chat_input_as_lines_and_media_as_placeholders(make_handler, read_rows) -> None:
    handler = make_handler()
    model = GenericFakeChatModel(messages=iter(["a cat"]))
    messages = [
        SystemMessage("Describe images."),
        HumanMessage(
            content=[
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
                {"type": "image", "source_type": "base64", "data": PNG_B64,
                 "mime_type": "image/png"},
                {"type": "image", "url": "https://example.com/cat.png"},
            ]
        ),
    ]  # fmt: skip
    assert model.invoke(messages, config={"callbacks": [handler]}).content == "a cat"
    assert handler.flush(timeout=60)

    (row,) = read_rows()
    # LangChain hands chat models (and callbacks) standard blocks in OpenAI's image_url form
    assert row["input_text"] == (
        "system: Describe images.\nuser: What is in this picture?\n"
        "[image_url]\n[image_url]\n[image_url]"
    )
    assert PNG_B64[:50] not in str(row)
    parts = row["input_messages"][1]["content"]
    assert parts[0] == {"type": "text", "text": "What is in this picture?"}
    data_url = {"type": "image_url", "mime_type": "image/png", "bytes": len(PNG_B64) + 22}
    assert parts[1] == parts[2] == data_url
    assert parts[3] == {"type": "image_url", "url": "https://example.com/cat.png"}


def test_standard_media_blocks_become_placeholders() -> None:
    parts = content_parts(
        [
            {"type": "image", "source_type": "base64", "data": PNG_B64, "mime_type": "image/png"},
            {"type": "audio", "base64": PNG_B64, "mime_type": "audio/wav"},
            {"type": "file", "data": b"%PDF-" * 100, "mime_type": "application/pdf"},
        ]
    )
    assert parts == [
        {"type": "image", "source_type": "base64", "mime_type": "image/png", "bytes": 5011},
        {"type": "audio", "mime_type": "audio/wav", "bytes": 5011},
        {"type": "file", "mime_type": "application/pdf", "bytes": 500},
    ]


def test_tool_calls_requested_by_the_model(make_handler, read_rows) -> None:
    handler = make_handler()
    reply = AIMessage(
        content="",
        tool_calls=[
            {"name": "add", "args": {"a": 1, "b": 2}, "id": "call-1"},
            {"name": "lookup", "args": {"q": "x"}, "id": "call-2"},
        ],
    )
    GenericFakeChatModel(messages=iter([reply])).invoke("sum", config={"callbacks": [handler]})
    assert handler.flush(timeout=60)

    (row,) = read_rows()
    assert row["tool_calls"] == [
        {"name": "add", "args": {"a": 1, "b": 2}, "id": "call-1"},
        {"name": "lookup", "args": {"q": "x"}, "id": "call-2"},
    ]
    assert row["output_messages"][0]["tool_calls"][0]["name"] == "add"


# -- token usage ------------------------------------------------------------------------------

USAGE_CASES = {
    "llm_output.token_usage": (
        UsageLLM(llm_output={
            "token_usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
            "model_name": "gpt-x-instruct",
        }),
        (11, 7, 18, None, None, "provider", "gpt-x-instruct"),
    ),
    "usage_metadata with details": (
        ScriptedChatModel(message=AIMessage(
            content="hi",
            usage_metadata={
                "input_tokens": 100, "output_tokens": 40, "total_tokens": 140,
                "input_token_details": {"cache_read": 64},
                "output_token_details": {"reasoning": 25},
            },
            response_metadata={"model_name": "gpt-x-2026"},
        )),
        (100, 40, 140, 64, 25, "provider", "gpt-x-2026"),
    ),
    "anthropic response_metadata.usage": (
        ScriptedChatModel(message=AIMessage(
            content="hi",
            response_metadata={
                "model": "claude-x",
                "usage": {"input_tokens": 30, "output_tokens": 9, "cache_read_input_tokens": 12},
            },
        )),
        (42, 9, 51, 12, None, "provider", "claude-x"),  # its input_tokens leave out the cache's
    ),
    "gemini generation_info.usage_metadata": (
        ScriptedChatModel(
            message=AIMessage(content="hi"),
            generation_info={
                "model_name": "gemini-x",
                "usage_metadata": {
                    "prompt_token_count": 21, "candidates_token_count": 5,
                    "total_token_count": 30, "thoughts_token_count": 4,
                },
            },
        ),
        (21, 5, 30, None, 4, "provider", "gemini-x"),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(USAGE_CASES))
def test_token_usage_from_every_provider_shape(make_handler, read_rows, case: str) -> None:
    model, expected = USAGE_CASES[case]
    handler = make_handler()
    model.invoke("count me", config={"callbacks": [handler]})
    assert handler.flush(timeout=60)

    (row,) = read_rows()
    got = tuple(
        row[k]
        for k in (
            "prompt_tokens", "completion_tokens", "total_tokens", "cache_read_tokens",
            "reasoning_tokens", "token_usage_source", "model_name",
        )
    )  # fmt: skip
    assert got == expected


def test_streamed_usage_on_the_last_chunk_is_counted_once(make_handler, read_rows) -> None:
    handler = make_handler()
    usage = {"input_tokens": 8, "output_tokens": 3, "total_tokens": 11}
    model = ScriptedChatModel(
        chunks=[
            AIMessageChunk(content="Hel"),
            AIMessageChunk(content="lo"),
            AIMessageChunk(content="!", usage_metadata=usage, chunk_position="last"),
        ]
    )
    assert "".join(str(c.content) for c in model.stream("x", config={"callbacks": [handler]})) == (
        "Hello!"
    )
    assert handler.flush(timeout=60)

    (row,) = read_rows()
    assert row["output_text"] == "Hello!"
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (8, 3, 11)
    assert row["token_usage_source"] == "stream"
    assert row["time_to_first_token_ms"] is not None


def test_model_params_provider_and_secrets(make_handler, read_rows) -> None:
    handler = make_handler()
    ScriptedChatModel(message=AIMessage(content="ok"), temperature=0.3).invoke(
        "x", config={"callbacks": [handler]}
    )
    assert handler.flush(timeout=60)

    (row,) = read_rows()
    assert row["model_name"] == "scripted-1"  # from invocation params
    assert row["provider"] == "scriptedchatmodel"  # LangChain's ls_provider
    assert row["invocation_params"]["temperature"] == 0.3
    assert row["invocation_params"]["api_key"] == "<removed>"
    assert "sk-scripted-secret" not in str(row)
    assert row["token_usage_source"] == "missing"
    assert row["total_tokens"] is None


# -- sessions and users -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "session", "user"),
    [
        ({"thread_id": "t-1", "user": "ann"}, "t-1", "ann"),
        ({"conversation_id": "c-1"}, "c-1", "default-user"),
        ({"session_id": "s-1", "thread_id": "t-1", "user_id": "u-1", "user": "x"}, "s-1", "u-1"),
        ({}, "default-session", "default-user"),
    ],
)
def test_session_and_user_precedence(make_handler, read_rows, metadata, session, user) -> None:
    handler = make_handler(session_id="default-session", user_id="default-user")
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | FakeListChatModel(
        responses=["r"]
    )
    chain.invoke({"q": "x"}, config={"callbacks": [handler], "metadata": metadata})
    assert handler.flush(timeout=60)

    rows = read_rows()
    assert len(rows) == 3
    assert {(r["session_id"], r["user_id"]) for r in rows} == {(session, user)}


# -- runs that never end ----------------------------------------------------------------------


def test_cancelled_astream_gives_cancelled_rows(make_handler, read_rows) -> None:
    handler = make_handler()
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | FakeListChatModel(
        responses=["a rather long answer that streams slowly"], sleep=1.0
    )

    async def main() -> str:
        seen: list[str] = []
        first = asyncio.Event()

        async def consume() -> None:
            async for chunk in chain.astream({"q": "x"}, config={"callbacks": [handler]}):
                seen.append(str(chunk.content))
                first.set()

        task = asyncio.create_task(consume())
        # cancelled mid-stream, inside the model's call: once a chunk came (not after a
        # fixed 80 ms, which a loaded machine may spend before the first one), and once the
        # consumer is back in the model, which sleeps a second before each chunk (the
        # consumer gets there in a few turns of the loop, with no I/O)
        await asyncio.wait_for(first.wait(), 60)
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return "".join(seen)

    partial = asyncio.run(main())
    assert 0 < len(partial) < len("a rather long answer that streams slowly")
    assert handler.flush(timeout=60)

    rows = read_rows()
    assert {r["status"] for r in rows if r["name"] != "ChatPromptTemplate"} == {"cancelled"}
    model_row = one(rows, run_type="chat_model")
    assert model_row["error_type"] == "CancelledError"
    assert model_row["output_text"] == partial  # exactly what the user saw so far


def test_a_stream_the_caller_closes_gives_cancelled_rows(make_handler, read_rows) -> None:
    """A consumer that stops reading (`break`, then `close()`) leaves the chain cut off like
    a cancelled task does: the sequence the caller streamed is `cancelled` too, not `ok`
    with a partial answer (langchain-core ends it with `on_chain_end` of what it had)."""
    handler = make_handler()
    answer = "a rather long answer that streams"
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | FakeListChatModel(
        responses=[answer]
    )
    stream = chain.stream({"q": "x"}, config={"callbacks": [handler]})
    seen = [str(next(stream).content) for _ in range(3)]
    stream.close()
    assert handler.flush(timeout=60)

    rows = read_rows()
    assert {(r["name"], r["status"]) for r in rows} == {
        ("RunnableSequence", "cancelled"), ("ChatPromptTemplate", "ok"),
        ("FakeListChatModel", "cancelled"),
    }  # fmt: skip
    # langchain-core adds a chunk to the sequence's output after its consumer took it, so a
    # close at that yield leaves out the last chunk seen; never more than was seen
    cut = one(rows, name="RunnableSequence")
    assert cut["output_text"] in ("".join(seen), "".join(seen[:-1])), cut["output_text"]
    assert cut["error_type"] == "StreamClosed"
    assert "still running" in cut["error_message"]


def test_a_closed_stream_leaves_no_run_inside_it_ok_with_part_of_its_output(
    make_handler, read_rows
) -> None:
    """prompt | model | parser, the usual chain, closed early: the parser (and the model)
    end after the sequence, with `on_chain_end` of what they had (langchain-core swallows
    the close); the parser's row must not say `ok` with the part the consumer took."""
    handler = make_handler()
    answer = "a rather long answer that streams"
    chain = (
        ChatPromptTemplate.from_messages([("human", "{q}")])
        | FakeListChatModel(responses=[answer])
        | StrOutputParser()
    )
    stream = chain.stream({"q": "x"}, config={"callbacks": [handler]})
    seen = [next(stream) for _ in range(3)]
    stream.close()
    assert handler.flush(timeout=60)

    rows = read_rows()
    assert one(rows, name="RunnableSequence")["status"] == "cancelled"
    parser = one(rows, name="StrOutputParser")
    assert answer.startswith(parser["output_text"]) and parser["output_text"] != answer
    assert len(parser["output_text"]) <= len(seen)
    assert (parser["status"], parser["error_type"]) == ("cancelled", "StreamClosed"), parser


def test_a_run_that_stops_reading_a_stream_and_goes_on_is_ok(make_handler, read_rows) -> None:
    """The other side of the closed-stream rule: code that takes what it needs of a model's
    stream and returns has finished; only the model call it left is cancelled."""
    handler = make_handler()
    model = FakeListChatModel(responses=["first words and then much more"])

    def first_two_chunks(q: str) -> str:
        taken = []
        for chunk in model.stream(q):
            taken.append(str(chunk.content))
            if len(taken) == 2:
                break
        return "".join(taken)

    out = RunnableLambda(first_two_chunks).invoke("x", config={"callbacks": [handler]})
    assert handler.flush(timeout=60)
    rows = read_rows()
    assert {(r["name"], r["status"]) for r in rows} == {
        ("first_two_chunks", "ok"), ("FakeListChatModel", "cancelled"),
    }  # fmt: skip
    assert one(rows, name="first_two_chunks")["output_text"] == out


def test_runs_without_an_end_are_swept_as_abandoned(make_handler, read_rows) -> None:
    handler = make_handler(run_ttl_s=0.4)
    release = threading.Event()

    def hang(x: str) -> str:
        release.wait(120)  # until released below, however long the sweep took
        return x

    worker = threading.Thread(
        target=lambda: RunnableLambda(hang).invoke("stuck", config={"callbacks": [handler]})
    )
    worker.start()
    wait_for(lambda: handler.stats()["abandoned"] == 1, 60, "the run to be swept as abandoned")
    assert handler.flush(timeout=60)
    (row,) = read_rows()
    assert row["status"] == "abandoned"
    assert row["input_text"] == "stuck"
    assert row["latency_ms"] >= 400

    release.set()
    worker.join()
    assert handler.flush(timeout=60)  # anything the late end had submitted is written now
    stats = handler.stats()
    assert stats["unmatched_ends"] == 1  # the late end is counted, not written twice
    assert stats["accepted"] == stats["written"] == 1
    assert len(read_rows()) == 1


def test_out_of_order_callbacks_are_counted_not_raised(make_handler, read_rows) -> None:
    handler = make_handler(max_pending_runs=3)
    run = uuid.uuid4()
    handler.on_chain_end({"x": 1}, run_id=uuid.uuid4())  # end without start
    handler.on_chain_start({}, {"q": 1}, run_id=run)
    handler.on_chain_end({"a": 1}, run_id=run)
    handler.on_chain_end({"a": 2}, run_id=run)  # double end
    handler.on_chain_error(ValueError("late"), run_id=run)  # error after end
    for _ in range(5):
        handler.on_chain_start({}, {"q": 2}, run_id=uuid.uuid4())
    stats = handler.stats()
    assert stats["unmatched_ends"] == 3
    assert stats["pending_runs"] == 3
    assert stats["untracked_runs"] == 2
    assert stats["callback_errors"] == 0
    assert handler.flush(timeout=60)
    (row,) = read_rows()
    assert row["output_text"] == '{"a":1}'


# -- bad input --------------------------------------------------------------------------------


class Point(BaseModel):
    x: int
    y: float


@dataclasses.dataclass
class Box:
    label: str
    items: list[Any]


def test_strange_values_give_valid_rows(make_handler, read_rows) -> None:
    handler = make_handler()
    deep: Any = "bottom"
    for _ in range(2000):
        deep = [deep]
    weird = {
        "when": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
        "id": uuid.UUID(int=7),
        "price": decimal.Decimal("1.10"),
        "raw": b"\xff\xfe",
        "model": Point(x=1, y=2.5),
        "box": Box("b", [1, {2, 3}]),
        "nan": float("nan"),
        "inf": float("-inf"),
        "surrogate": "bad \udcff byte",
        "deep": deep,
        "huge": list(range(50_000)),
        7: "int key",
    }
    chain = RunnableLambda(lambda d: d)
    out = chain.invoke(weird, config={"callbacks": [handler], "metadata": {"weird": weird}})
    assert out is not None
    assert handler.flush(timeout=60)

    (row,) = read_rows()
    meta = row["metadata"]["weird"]
    assert meta["when"] == "2026-01-02T03:04:05+00:00"
    assert meta["id"] == str(uuid.UUID(int=7))
    assert meta["price"] == 1.1
    assert meta["raw"] == "<2 bytes>"
    assert meta["model"] == {"x": 1, "y": 2.5}
    assert meta["box"]["items"][0] == 1
    assert (meta["nan"], meta["inf"]) == ("nan", "-inf")
    assert meta["surrogate"] == "bad \ufffd byte"
    assert meta["7"] == "int key"
    assert len(meta["huge"]) == 10_001
    assert "bad \ufffd byte" in row["input_text"]
    assert row["output_text"] == row["input_text"]


def test_twenty_megabyte_prompt(make_handler, read_rows) -> None:
    handler = make_handler()
    prompt = "x" * 20_000_000
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | FakeListChatModel(
        responses=["read it"]
    )
    assert chain.invoke({"q": prompt}, config={"callbacks": [handler]}).content == "read it"
    assert handler.flush(timeout=60)

    rows = read_rows()
    assert len(rows) == 3
    stats = handler.stats()
    assert stats["written"] == 3
    model_row = one(rows, run_type="chat_model")
    assert model_row["is_truncated"] is True
    assert model_row["input_text"].startswith("user: xxx")
    assert len(model_row["input_text"]) == 200_000
    assert model_row["input_messages"]["truncated"] is True
    assert model_row["output_text"] == "read it"
    assert model_row["is_truncated"] is True
