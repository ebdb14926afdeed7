"""The canonical form the hash chain is taken over, pinned byte for byte.

A row's `row_hash` is the SHA-256 of these bytes; chains already in tables verify only while
they stay the same. Each case is checked with orjson (the fast path) and with the standard
library alone (where orjson is missing), so neither can drift from the other.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from langchain_bq_audit import integrity, jsoncodec
from langchain_bq_audit.integrity import canonical, row_hash
from langchain_bq_audit.jsoncodec import compact_json, exact_float, sorted_json
from langchain_bq_audit.sinks.insert_all import request_body

BASE: dict[str, Any] = {"timestamp": "2026-01-02T03:04:05.000007+00:00", "event_id": "e-1",
                        "tags": [], "session_id": None}  # fmt: skip
T = b'"timestamp":1767323045000007'
PINNED: dict[str, tuple[dict[str, Any], bytes]] = {
    # floats json spells with an exponent (orjson would not), -0.0, integral floats
    "floats": (
        {
            **BASE,
            "latency_ms": 0.1,
            "time_to_first_token_ms": -0.0,
            "sample_rate": 1e-05,
            "metadata": '{"z":1e20,"a":[0.1,-0.0,1.0,1e16,9007199254740993.0,1e-05,0.0001,'
            "2.5e-07,-1.5e300]}",
        },
        b'{"event_id":"e-1","latency_ms":0.1,"metadata":{"a":[0.1,0,1,1e+16,9007199254740992,'
        b'1e-05,0.0001,2.5e-07,-1.5e+300],"z":1e+20},"sample_rate":1e-05,'
        b'"time_to_first_token_ms":0,' + T + b"}",
    ),
    # non-ASCII raw, control characters escaped, keys sorted by code point, nested values,
    # empty JSON values left out, ints in STRING columns as digits, RFC 3339's Z
    "text": (
        {
            **BASE,
            "start_time": "2026-01-02T03:04:04.5Z",
            "user_id": 12345,
            "input_text": 'caf\u00e9 \u2028 \U0001f600 \x00\x1f\x7f "q" \\ /\n\t',
            "metadata": '{"\u00e9":{"y":null,"b":"\u00e9\\u00e9\\ud83d\\ude00"},"\U0001f600":1,'
            '"\uffff":2,"Z":3,"a":[]}',
            "input_messages": "[]",
            "tool_calls": "null",
            "output_messages": '[{"role":"assistant","content":"ok"}]',
        },
        b'{"event_id":"e-1","input_text":"caf\xc3\xa9 \xe2\x80\xa8 \xf0\x9f\x98\x80 '
        b'\\u0000\\u001f\x7f \\"q\\" \\\\ /\\n\\t","metadata":{"Z":3,"a":[],"\xc3\xa9":'
        b'{"b":"\xc3\xa9\xc3\xa9\xf0\x9f\x98\x80","y":null},"\xef\xbf\xbf":2,'
        b'"\xf0\x9f\x98\x80":1},"output_messages":[{"content":"ok","role":"assistant"}],'
        b'"start_time":1767323044500000,' + T + b',"user_id":"12345"}',
    ),
    # NaN and infinities a JSON column's text may hold (json reads them; orjson writes null)
    "nan": (
        {**BASE, "metadata": '{"n":NaN,"i":-Infinity,"j":Infinity,"x":1e400}'},
        b'{"event_id":"e-1","metadata":{"i":-Infinity,"j":Infinity,"n":NaN,"x":Infinity},'
        + T
        + b"}",
    ),
    # ints beyond 64 bits (orjson refuses them)
    "big_int": (
        {**BASE, "prompt_tokens": 2**70, "metadata": '{"big":123456789012345678901234567890}'},
        b'{"event_id":"e-1","metadata":{"big":123456789012345678901234567890},'
        b'"prompt_tokens":1180591620717411303424,' + T + b"}",
    ),
    # a lone surrogate (orjson refuses it), kept as surrogatepass bytes
    "surrogate": (
        {**BASE, "input_text": "a\ud800b"},
        b'{"event_id":"e-1","input_text":"a\xed\xa0\x80b",' + T + b"}",
    ),
}


@pytest.fixture(params=["orjson", "json"])
def codec(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Each test twice: with orjson, and as if it were not installed."""
    if request.param == "json":
        monkeypatch.setattr(jsoncodec, "_loaded", True)
        monkeypatch.setattr(jsoncodec, "_orjson_dumps", None)
    else:
        jsoncodec._load()
        assert jsoncodec._orjson_dumps is not None  # orjson is a dependency
    yield request.param


@pytest.mark.parametrize("case", list(PINNED))
def test_canonical_bytes_are_pinned(codec: str, case: str) -> None:
    row, expected = PINNED[case]
    assert canonical(row) == expected


def test_canonical_of_a_row_read_back_is_pinned(codec: str) -> None:
    read_back = {"timestamp": dt.datetime(2026, 1, 2, 3, 4, 5, 7, tzinfo=dt.timezone.utc),
                 "latency_ms": 1e-05, "metadata": {"z": 1e20, "a": [0.1, -0.0, 1.0]},
                 "tags": [], "row_hash": "x"}  # fmt: skip
    assert canonical(read_back, json_parsed=True) == (
        b'{"latency_ms":1e-05,"metadata":{"a":[0.1,0,1],"z":1e+20},' + T + b"}"
    )


def test_row_hash_is_pinned(codec: str) -> None:
    row = PINNED["text"][0]
    assert row_hash(row) == "f84b4bd3167a51a73de65d5f636ded59142f9eec6f7e1a01dbd8a7599aed101e"


ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True)
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**80), 2**80) | ANY_FLOAT | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def _exact(value: Any) -> Any:
    """What the canonical form hands the encoder: floats through `exact_float`."""
    if isinstance(value, float):
        return exact_float(value)
    if isinstance(value, dict):
        return {k: _exact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_exact(v) for v in value]
    return value


@settings(max_examples=150, deadline=None)
@given(JSONISH)
def test_sorted_json_is_what_json_dumps_gives(value: Any) -> None:
    expected = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert sorted_json(_exact(value)) == expected.encode("utf-8", "surrogatepass")


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**64 - 1))
def test_every_float_is_spelled_as_repr_spells_it(bits: int) -> None:
    value = struct.unpack("<d", struct.pack("<Q", bits))[0]
    expected = repr(value) if math.isfinite(value) else json.dumps(value)
    assert sorted_json([exact_float(value)]) == f"[{expected}]".encode()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.dictionaries(st.text(), JSONISH, max_size=5), max_size=5))
def test_request_body_holds_what_insert_rows_json_sends(rows: list[dict[str, Any]]) -> None:
    ids = [f"id-{i}" for i in range(len(rows))]
    body = request_body(rows, ids)

    def same(value: Any) -> Any:  # NaN == NaN, and -0.0 as 0.0, for the comparison
        return json.loads(json.dumps(value), parse_constant=lambda c: None)

    sent = {"rows": [{"insertId": i, "json": r} for r, i in zip(rows, ids, strict=True)]}
    decoded = json.loads(body, parse_constant=lambda c: None)
    assert same(decoded) == same(sent)
    assert compact_json({"a": "\ud800"}) == b'{"a":"\\ud800"}'  # json's escape, valid JSON


def test_rows_hold_plain_strings() -> None:
    # langchain-core's `message.text` is a str subclass, which orjson refuses (the whole row
    # would go the slow way): the row holds its plain text
    from langchain_core.messages import AIMessage

    from langchain_bq_audit.rows import render

    text = AIMessage("ok").text
    assert type(render(text)) is str and render(text) == "ok"


def _shape(value: Any) -> Any:
    """`value` with every scalar's type next to it (an `ExactFloat` is not a float)."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return type(value).__name__, repr(value)


@settings(max_examples=150, deadline=None)
@given(JSONISH)
def test_a_json_column_is_parsed_as_the_decoder_parses_it(value: Any) -> None:
    """The canonical form's fast parse (scanner, values kept per text) against `decode`,
    also for text around which `decode` skips whitespace, and for text it refuses."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    for variant in (text, f" {text}\n", f"[{text}]", f"{text}x", text[:-1]):
        try:
            expected = integrity._DECODE(variant)
        except ValueError as exc:
            with pytest.raises(type(exc)):
                integrity._json_value(variant)
            continue
        for _ in range(2):  # parsed, then kept
            assert _shape(integrity._json_value(variant)) == _shape(expected)
