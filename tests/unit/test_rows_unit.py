"""Row building without BigQuery: values, media, outcome, identity, the canonical form."""

from __future__ import annotations

import base64
import decimal
import json
import os
import re
import subprocess
import sys
import uuid
from typing import Any

import numpy as np
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, LLMResult
from langchain_core.prompt_values import ChatPromptValue
from langgraph.errors import GraphInterrupt, ParentCommand
from langgraph.types import Command, Interrupt

from langchain_bq_audit.integrity import canonical
from langchain_bq_audit.records import RunRecord
from langchain_bq_audit.redact import KEY_MARKERS
from langchain_bq_audit.rows import (
    _getattr,
    _plain,
    build_row,
    content_parts,
    dumps,
    ident_text,
    json_column,
    json_text,
    media_text,
    new_event_id,
    render,
    resolve_session_user,
    returned_error,
    run_status,
    to_jsonable,
    token_usage,
)
from langchain_bq_audit.tracker import RunTracker

BLOB = base64.b64encode(b"\x89PNG\r\n\x1a\n" + os.urandom(1000)).decode()


def record(outputs: Any = None, error: BaseException | None = None) -> RunRecord:
    rec = RunRecord("chain", uuid.uuid4(), None, uuid.uuid4(), None, {"q": "x"}, "c", None,
                    None, None, 1.0)  # fmt: skip
    rec.end_time, rec.outputs = 2.0, outputs
    if error is not None:
        rec.status, rec.error = "error", error
    return rec


def test_numbers_keep_their_type() -> None:
    value = {
        "f32": np.float32(0.87), "i64": np.int64(-3), "b": np.bool_(False), "zero_d": np.array(4),
        "arr": np.arange(3, dtype=np.int32), "f16": np.array([0.1, 1.5], dtype=np.float16),
        "dec": decimal.Decimal("19.90"), "wide": decimal.Decimal("1.00000000000000000001"),
        "nan": decimal.Decimal("NaN"), "big": 2**60, "s": np.str_("t"),
    }  # fmt: skip
    expected = {
        "f32": 0.87, "i64": -3, "b": False, "zero_d": 4, "arr": [0, 1, 2], "f16": [0.1, 1.5],
        "dec": 19.9, "wide": "1.00000000000000000001", "nan": "NaN", "big": str(2**60), "s": "t",
    }  # fmt: skip
    assert json.dumps(to_jsonable(value)) == json.dumps(expected)


def test_numpy_is_not_imported_for_values_that_do_not_come_from_it() -> None:
    code = (
        "import sys, decimal; from langchain_bq_audit.rows import to_jsonable;"
        "to_jsonable({'a': decimal.Decimal('1.5'), 'b': [1.0, 'x' * 5000], 'c': b'xy'});"
        "print('numpy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("text", "placeholder"),
    [
        ("data:image/png;base64,iVBORw0", "<image/png 29 bytes>"),
        ("data:,hello", "<11 bytes>"),
        (BLOB, f"<image/png {len(BLOB)} bytes>"),
        (base64.b64encode(os.urandom(900)).decode(), "<1200 bytes>"),
        ("x" * 5000, None),  # one letter over and over is text
        ('data: {"event": 1}', None),  # a server-sent event line, not a data URL
        ("word " * 400, None),
        (base64.b64encode(os.urandom(600)).decode(), None),  # under 1,024 characters
    ],
)
def test_media_is_told_by_what_it_holds(text: str, placeholder: str | None) -> None:
    assert media_text(text) == placeholder


def test_media_placeholders_are_the_same_in_text_json_and_parts() -> None:
    url = f"data:image/png;base64,{BLOB}"
    expected = f"<image/png {len(url)} bytes>"
    assert render(url) == render({"image": url}) == expected
    assert render({"image": url, "n": 1}) == json.dumps({"image": expected, "n": 1},
                                                         separators=(",", ":"))  # fmt: skip
    assert to_jsonable(b"\x89PNG" + b"0" * 96) == "<image/png 100 bytes>"
    thinking = {"type": "thinking", "thinking": "t" * 3000}
    image = {"type": "image_url", "image_url": {"url": url}}
    assert content_parts([thinking, image]) == [
        thinking, {"type": "image_url", "mime_type": "image/png", "bytes": len(url)}]  # fmt: skip


def test_errors_returned_as_values() -> None:
    failed = ToolMessage("order A-1 not found", tool_call_id="c", status="error")
    fine = ToolMessage("found", tool_call_id="c")
    assert returned_error(failed) == ("ToolMessage", "order A-1 not found")
    assert returned_error({"messages": [failed, failed]}) == (
        "ToolMessage", "order A-1 not found\norder A-1 not found")  # fmt: skip
    assert returned_error({"messages": [failed, fine]}) is None  # one call went through
    assert returned_error(ValueError("bad")) == ("ValueError", "bad")
    assert returned_error({"a": 1}) is returned_error("x") is returned_error(fine) is None
    assert run_status(record(failed)) == "error"
    row = build_row(record(failed))
    assert (row["status"], row["error_type"], row["error_message"], row["output_text"]) == (
        "error", "ToolMessage", "order A-1 not found", "")  # fmt: skip


def test_langgraph_control_flow_is_interrupted_with_its_value() -> None:
    paused = GraphInterrupt([Interrupt(value={"question": "ok?"}, id="i1")])
    row = build_row(record(error=paused))
    assert (row["status"], row["error_type"], row["error_message"]) == (
        "interrupted", "GraphInterrupt", '{"question":"ok?"}')  # fmt: skip
    two = GraphInterrupt([Interrupt(value="a", id="1"), Interrupt(value=2, id="2")])
    assert build_row(record(error=two))["error_message"] == '["a",2]'
    handoff = build_row(record(error=ParentCommand(Command(goto="billing"))))
    assert (handoff["status"], handoff["error_type"]) == ("interrupted", "ParentCommand")
    assert json.loads(handoff["error_message"])["goto"] == "billing"


def test_session_and_user_precedence_and_ids_as_text() -> None:
    assert resolve_session_user({"thread_id": "t"}, "ctx", "u", ("conf", 5)) == ("t", "5")
    assert resolve_session_user({}, "ctx", 12345, ("conf", None)) == ("conf", "12345")
    assert resolve_session_user(None, 7, None, None) == ("7", None)
    assert resolve_session_user({"session_id": "", "user_id": 0}, None, None) == (None, "0")
    own = ("chat_id",), ("member",)
    assert resolve_session_user({"session_id": "s", "member": 4}, None, None, None, *own) == (
        None,
        "4",
    )
    assert resolve_session_user({}, None, None, ("c-1", "m"), *own) == ("c-1", "m")
    assert ident_text(np.int64(9)) == "9" and ident_text(uuid.UUID(int=1)) == str(uuid.UUID(int=1))


def test_a_count_beyond_int64_is_null_and_the_rest_kept() -> None:
    usage = {"input_tokens": 10**19, "output_tokens": 7, "total_tokens": 10**19 + 7}
    result = LLMResult(generations=[[ChatGeneration(message=AIMessage("", usage_metadata=usage))]])
    counts, _ = token_usage(result, streamed=False)
    assert counts is not None
    assert (counts["prompt_tokens"], counts["completion_tokens"], counts["total_tokens"]) == (
        None,
        7,
        None,
    )
    anthropic = {"input_tokens": 2**63 - 1, "output_tokens": 1, "cache_read_input_tokens": 5}
    meta = AIMessage("", response_metadata={"usage": anthropic})
    counts, _ = token_usage(LLMResult(generations=[[ChatGeneration(message=meta)]]), False)
    assert counts is not None and counts["prompt_tokens"] is None and counts["total_tokens"] is None


def test_usage_is_missing_only_when_no_place_holds_it() -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    bare = ChatGeneration(message=AIMessage("ok"))  # response_metadata {}, generation_info None
    assert token_usage(LLMResult(generations=[[bare]]), False) == (None, "missing")
    assert token_usage(LLMResult(generations=[[bare]], llm_output={}), False) == (None, "missing")
    after_empty = LLMResult(generations=[[bare]], llm_output={"token_usage": usage})
    assert token_usage(after_empty, False) == ({**usage, "cache_read_tokens": None,
        "cache_write_tokens": None, "reasoning_tokens": None}, "provider")  # fmt: skip
    second = ChatGeneration(message=AIMessage("ok", response_metadata={"token_usage": usage}))
    counts, source = token_usage(LLMResult(generations=[[bare, second]]), False)
    assert source == "provider" and counts is not None and counts["total_tokens"] == 5


def test_usage_zeros_are_counts() -> None:
    usage = {
        "input_tokens": 0,
        "output_tokens": np.int64(0),
        "total_tokens": 0,
        "input_token_details": {"cache_read": 0, "cache_creation": 0},
        "output_token_details": {"reasoning": 0},
    }
    result = LLMResult(generations=[[ChatGeneration(message=AIMessage("", usage_metadata=usage))]])
    counts, source = token_usage(result, streamed=False)
    assert source == "provider" and counts == dict.fromkeys(
        ("prompt_tokens", "completion_tokens", "total_tokens", "cache_read_tokens",
         "cache_write_tokens", "reasoning_tokens"), 0)  # fmt: skip


def test_event_ids_are_unique_uuid4s() -> None:
    ids = {new_event_id() for _ in range(1000)}
    assert len(ids) == 1000 and {uuid.UUID(i).version for i in ids} == {4}


def test_canonical_form_matches_what_bigquery_gives_back() -> None:
    written = {"timestamp": "2026-01-01T00:00:00.000000+00:00", "user_id": 12345,
               "input_messages": "[]", "metadata": '{"a":1.0,"b":[]}', "tool_calls": "null",
               "tags": [], "latency_ms": 2.0, "session_id": None}  # fmt: skip
    read_back = {"timestamp": "2026-01-01T00:00:00+00:00", "user_id": "12345",
                 "input_messages": None, "metadata": {"a": 1, "b": []}, "tool_calls": None,
                 "tags": [], "latency_ms": 2.0}  # fmt: skip
    assert canonical(written) == canonical(read_back, json_parsed=True)


def test_repeated_run_ids_pair_ends_by_thread() -> None:
    tracker = RunTracker(100, 60)
    run_id = uuid.uuid4()
    first, second = record(), record()
    first.run_id = second.run_id = run_id
    first.thread, second.thread = 1, 2
    tracker.runs[run_id] = first
    tracker.add_repeat(second)
    assert tracker.run_id_collisions == 1 and len(tracker.runs) == 2
    key = tracker.key_to_end(run_id, thread=2)
    assert tracker.runs.pop(key) is second
    assert tracker.key_to_end(run_id, thread=2) == run_id and not tracker.repeats


def test_a_timestamp_hashes_the_same_in_every_rfc3339_spelling() -> None:
    """Python 3.10 cannot parse a trailing Z: the hash chain must not depend on it."""
    from langchain_bq_audit.integrity import _micros

    spellings = ["2026-11-30T10:00:00.000001Z", "2026-11-30T10:00:00.000001+00:00",
                 "2026-11-30 10:00:00.000001"]  # fmt: skip
    assert len({_micros(s) for s in spellings}) == 1


# -- fast paths: the same values as the general code ------------------------------------------

KEYS = st.sampled_from(["q", "api_key", "apiKey", "max_tokens", "content", "é", ""]) | st.text()
SCALARS = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
    | st.text(st.characters(codec=None), max_size=8)  # lone surrogates too
    | st.sampled_from(["data:image/png;base64,iVBORw0KGgo=", BLOB, "x" * 1500, "\u2028\x00\x7f"])
)  # fmt: skip
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.lists(inner, max_size=3).map(tuple)
    | st.dictionaries(KEYS, inner, max_size=4)
    | st.dictionaries(st.integers(0, 3), inner, max_size=2),
    max_leaves=16,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(VALUES)
def test_a_json_column_is_dumps_of_to_jsonable(value: Any) -> None:
    """`json_column`'s fast path (no copy, orjson) writes what the general path writes:
    secret-looking keys, media, big ints, floats with exponents, NaN, lone surrogates,
    tuples and int keys included."""
    assert json_column(value) == dumps(to_jsonable(value))


def _json_text_before(value: Any) -> str:
    """`json_text` as it was before its fast paths: the oracle for them."""
    text = dumps(value)
    if (len(text) > 64 and ("data:" in text or re.search("[A-Za-z0-9+/_-]{1024}", text))) or (
        any(m in text.lower() for m in KEY_MARKERS)
    ):
        text = dumps(to_jsonable(value))
    return text


@settings(max_examples=300, deadline=None)
@given(VALUES, st.sampled_from([None, AIMessage("hi"), object()]))
def test_json_text_is_what_it_was(value: Any, other: Any) -> None:
    """`render`'s JSON of dicts and other values: plain values, values with messages or
    unknown objects inside (converted by `to_jsonable`), secret keys, media."""
    for case in (value, {"x": value, "m": other}, [other, value]):
        assert json_text(case) == _json_text_before(case)


def test_a_json_column_past_the_limits_is_cut_as_before() -> None:
    deep: Any = "leaf"
    for _ in range(40):
        deep = {"k": [deep]}
    long_list = list(range(10_001))
    for value in (deep, long_list, {"a": long_list}, {str(i): i for i in range(10_001)}):
        assert not _plain(value)
        assert json_column(value) == dumps(to_jsonable(value))
    # what rows hold most: metadata, params, messages take the fast path
    metadata = {"ls_provider": "openai", "temperature": 0.7, "stop": None, "n": [1, 2.5]}
    assert _plain(metadata) and json_column(metadata) == dumps(to_jsonable(metadata))


class _Extra(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")
    _private: str = pydantic.PrivateAttr(default="p")
    field: int = 1

    @property
    def shown(self) -> str:
        return "property"


def test_a_pydantic_models_missing_attribute_is_what_getattr_gives() -> None:
    """`_getattr` skips pydantic's raising `__getattr__` only where it would raise."""
    prompt = ChatPromptValue(messages=[AIMessage("hi")])
    extra = _Extra(content="from extras")  # type: ignore[call-arg]
    objects = [prompt, AIMessage("hi"), extra, _Extra(), {"content": 1}, "text", None]
    names = ["content", "type", "messages", "_private", "field", "shown", "status", "nope"]
    for obj in objects:
        for name in names:
            for _ in range(2):  # the type's answer is kept after the first
                assert _getattr(obj, name, "<missing>") == getattr(obj, name, "<missing>")
    assert _getattr(prompt, "content", "<missing>") == "<missing>"
    assert _getattr(extra, "content", None) == "from extras"
