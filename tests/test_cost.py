"""Cost per call, read back from BigQuery: genai-prices' price of real model names, NULL when
unknown, the user's own prices, the views and `bq-audit stats`, and an older table migrated."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import genai_prices
import pytest
from genai_prices import Usage, calc_price
from google.cloud import bigquery
from langchain_core.output_parsers import StrOutputParser

from langchain_bq_audit import schema

from .conftest import query
from .models import ProviderChatModel
from .test_cli import bq_audit

SOURCE = f"genai-prices {genai_prices.__version__}"
OWN_PRICES = {"acme-ft-1": {"input": 3, "output": 15, "cache_read": 0.3}}


def usage(
    prompt: int, completion: int, cache_read: int = 0, cache_write: int = 0
) -> dict[str, Any]:
    details = {"cache_read": cache_read, "cache_creation": cache_write}
    return {"input_tokens": prompt, "output_tokens": completion,
            "total_tokens": prompt + completion, "input_token_details": details}  # fmt: skip


# (session, provider as LangChain's integrations name it, model, usage_metadata)
CALLS = [
    ("s-1", "openai", "gpt-4o", usage(1200, 300, cache_read=1024)),
    ("s-1", "anthropic", "claude-sonnet-4-20250514", usage(5000, 400, 3000, 1500)),
    ("s-2", "google_genai", "gemini-2.5-flash", usage(800, 100)),
    ("s-2", "openai", "acme-unknown-9", usage(100, 10)),  # genai-prices does not know it
    ("s-2", "openai", "acme-ft-1", usage(1000, 500, cache_read=200)),  # OWN_PRICES
]


def run_calls(handler: Any) -> None:
    for session, provider, model, counts in CALLS:
        chat = ProviderChatModel.answer(provider, model, f"answer from {model}", counts)
        chat.invoke(f"ask {model}", config={"callbacks": [handler],
                                            "metadata": {"session_id": session}})  # fmt: skip
    assert handler.flush(timeout=60)


def expected_price(provider: str, model: str, counts: dict[str, Any], start: dt.datetime) -> Any:
    cached = counts["input_token_details"]
    return calc_price(
        Usage(input_tokens=counts["input_tokens"], output_tokens=counts["output_tokens"],
              cache_read_tokens=cached["cache_read"], cache_write_tokens=cached["cache_creation"]),
        model, provider_id=provider, genai_request_timestamp=start,
    )  # fmt: skip


def test_each_model_call_is_priced_as_genai_prices_prices_it(make_handler, read_rows) -> None:
    run_calls(make_handler(prices=OWN_PRICES))
    rows = {r["model_name"]: r for r in read_rows()}
    assert len(rows) == len(CALLS)

    for _, provider, model, counts in CALLS[:3]:
        row = rows[model]
        want = expected_price(provider, model, counts, row["start_time"])
        assert want.total_price > 0
        assert (row["provider"], row["price_source"]) == (provider, SOURCE)
        assert row["cost_usd"] == float(want.total_price)
        details = row["cost_details"]
        assert (details["model"], details["provider"]) == (want.model.id, want.provider.id)
        assert details["output"] == float(want.output_price)
        input_parts = (
            details["input"] + details.get("cache_read", 0) + details.get("cache_write", 0)
        )
        assert input_parts == pytest.approx(float(want.input_price), rel=1e-12)
        cached = counts["input_token_details"]
        assert (row["cache_read_tokens"], row["cache_write_tokens"]) == (
            cached["cache_read"], cached["cache_creation"])  # fmt: skip
    claude = rows["claude-sonnet-4-20250514"]["cost_details"]
    assert claude["cache_write"] > 0 and claude["cache_read"] > 0  # parts of their own

    unknown = rows["acme-unknown-9"]  # never guessed: counted, not priced
    assert (unknown["prompt_tokens"], unknown["cost_usd"]) == (100, None)
    assert (unknown["cost_details"], unknown["price_source"]) == (None, None)

    own = rows["acme-ft-1"]  # 800 at $3/M + 200 cached at $0.30/M + 500 out at $15/M
    assert own["price_source"] == "override"
    assert own["cost_usd"] == pytest.approx(0.0024 + 0.00006 + 0.0075, rel=1e-12)
    assert own["cost_details"] == {
        "input": pytest.approx(0.0024), "cache_read": pytest.approx(0.00006),
        "output": pytest.approx(0.0075), "model": "acme-ft-1", "provider": "openai",
    }  # fmt: skip


@pytest.mark.usefixtures("writer_makes_views")
def test_views_and_stats_show_the_cost(emulator, bq_client, make_handler, table_name,
                                       read_rows) -> None:  # fmt: skip
    run_calls(make_handler(prices=OWN_PRICES))
    costs = {r["model_name"]: r["cost_usd"] for r in read_rows()}
    s1 = costs["gpt-4o"] + costs["claude-sonnet-4-20250514"]
    s2 = costs["gemini-2.5-flash"] + costs["acme-ft-1"]
    table = f"{bq_client.project}.language_model_logging.{table_name}"

    sessions = {r["session_id"]: r for r in query(bq_client, f"SELECT * FROM `{table}_sessions`")}
    assert sessions["s-1"]["cost_usd"] == pytest.approx(s1, rel=1e-12)
    assert sessions["s-2"]["cost_usd"] == pytest.approx(s2, rel=1e-12)
    assert (sessions["s-1"]["unpriced_calls"], sessions["s-2"]["unpriced_calls"]) == (0, 1)
    daily = {r["model_name"]: r for r in query(bq_client, f"SELECT * FROM `{table}_daily_usage`")}
    assert daily["gpt-4o"]["cost_usd"] == costs["gpt-4o"]
    assert (daily["acme-unknown-9"]["cost_usd"], daily["acme-unknown-9"]["unpriced_calls"]) == (
        None, 1)  # fmt: skip

    where = ("--endpoint", emulator.host_port, "--table", table_name)
    stats = json.loads(bq_audit("stats", "--json", *where).stdout)
    assert stats["cost_usd"] == pytest.approx(s1 + s2, rel=1e-12)
    assert stats["cost_usd_24h"] == pytest.approx(s1 + s2, rel=1e-12)
    assert (stats["model_calls_24h"], stats["unpriced_calls"]) == (5, 1)
    assert stats["unpriced_calls_24h"] == 1
    human = bq_audit("stats", *where)
    assert human.returncode == 0, human.stderr
    assert (f"cost: ${s1 + s2:,.6f} (+1 unpriced) in all; ${s1 + s2:,.6f} (+1 unpriced) over "
            "5 model calls in the last 24 h") in human.stdout.splitlines()  # fmt: skip

    # sessions: a cost some calls are missing from says how many, in text and JSON
    listed = bq_audit("sessions", *where)
    assert listed.returncode == 0, listed.stderr
    header, two, one = listed.stdout.splitlines()
    assert (two.split()[0], two.split()[8:]) == (
        "s-2",
        [f"${s2:.6f}", "(+1", "unpriced)", "0", "0"],
    )
    assert (one.split()[0], one.split()[8:]) == ("s-1", [f"${s1:.6f}", "0", "0"])
    assert header.index("cost") + 4 == two.index("unpriced)") + 9 == one.index(f"{s1:.6f}") + 8
    as_json = [json.loads(x) for x in bq_audit("sessions", "--json", *where).stdout.splitlines()]
    assert [(x["session_id"], x["unpriced_calls"]) for x in as_json] == [("s-2", 1), ("s-1", 0)]


@pytest.mark.usefixtures("writer_makes_views")
def test_a_trace_and_its_session_show_a_partial_cost_with_its_unpriced_calls(
    emulator, bq_client, make_handler, table_name, read_rows
) -> None:
    # OpenAI answers with a dated name; your price for gpt-4o, with its provider in any case
    handler = make_handler(prices={"GPT-4o": {"input": 2, "output": 8, "provider": "OpenAI"}})
    chain = ProviderChatModel.answer("openai", "gpt-4o-2024-08-06", "a", usage(1000, 500))
    chain = chain | StrOutputParser() | ProviderChatModel.answer("openai", "acme-unknown-9", "b",
                                                                 usage(100, 10))  # fmt: skip
    chain.invoke("ask", config={"callbacks": [handler], "metadata": {"session_id": "s-3"}})
    assert handler.flush(timeout=60)
    rows = read_rows()
    priced = {r["model_name"]: (r["cost_usd"], r["price_source"]) for r in rows}
    # 1000 in at $2/M and 500 out at $8/M; the private model has no price
    assert priced == {"gpt-4o-2024-08-06": (0.006, "override"), "acme-unknown-9": (None, None),
                      None: (None, None)}  # fmt: skip
    (root,) = [r for r in rows if r["name"] == "RunnableSequence"]

    where = ("--endpoint", emulator.host_port, "--table", table_name)
    trace = bq_audit("trace", root["trace_id"], *where)
    assert trace.returncode == 0, trace.stderr
    assert trace.stdout.splitlines()[0] == (
        f"trace {root['trace_id']}: 4 runs, 2 model call(s), 0 error(s), 1,610 tokens, cost "
        f"$0.006000 (+1 unpriced); session s-3; started {root['start_time']:%Y-%m-%d %H:%M:%S} UTC"
    )
    (session,) = bq_audit("sessions", *where).stdout.splitlines()[1:]
    assert session.split()[8:] == ["$0.006000", "(+1", "unpriced)", "0", "0"]


COST_ERA = ("cache_write_tokens", "cost_usd", "cost_details", "price_source")


def test_init_gives_a_table_from_before_cost_the_cost_columns_and_keeps_its_rows(
    emulator, bq_client, make_handler, table_name, read_rows
) -> None:
    older = [c for c in schema.COLUMNS if c.name not in COST_ERA]
    full = f"{bq_client.project}.language_model_logging.{table_name}"
    bq_client.create_dataset(full.rsplit(".", 1)[0], exists_ok=True)
    bq_client.create_table(bigquery.Table(full, schema=schema.to_schema_fields(tuple(older))))
    assert bq_client.insert_rows_json(full, [{
        "timestamp": "2026-01-02T03:04:05+00:00", "input_text": "old question",
        "output_text": "old answer", "event_id": "old-1", "run_type": "chat_model",
        "model_name": "gpt-4o", "provider": "openai", "total_tokens": 7,
    }]) == []  # fmt: skip
    before = bigquery.Table(f"{full}_daily_usage")  # a view from before cost, as it was made
    before.view_query = f"SELECT DATE(timestamp) AS day, COUNT(*) AS calls FROM `{full}` GROUP BY 1"
    bq_client.create_table(before)

    # a busy emulator may take over init's default 30 s a request
    init = bq_audit("init", "--endpoint", emulator.host_port, "--table", table_name,
                    "--timeout", "120", timeout=600)  # fmt: skip
    assert init.returncode == 0, init.stderr
    assert f"table {full}: added columns {', '.join(COST_ERA)}" in init.stdout
    assert f"view {full}_sessions: created" in init.stdout
    assert f"view {full}_daily_usage: updated" in init.stdout
    names = {f.name for f in bq_client.get_table(f"{full}_daily_usage").schema}
    assert {"cost_usd", "unpriced_calls", "p95_latency_ms"} <= names  # the view's new columns
    assert query(bq_client, f"SELECT cost_usd, unpriced_calls FROM `{full}_daily_usage`") == [
        {"cost_usd": None, "unpriced_calls": 1}
    ]

    run_calls(make_handler(prices=OWN_PRICES))
    rows = read_rows()
    (old,) = [r for r in rows if r["event_id"] == "old-1"]
    assert (old["input_text"], old["total_tokens"], old["cost_usd"]) == ("old question", 7, None)
    assert sum(r["cost_usd"] is not None for r in rows) == 4  # new rows carry their cost


def test_a_count_beyond_int64_leaves_the_row_with_that_count_null(make_handler, read_rows) -> None:
    """insertAll refuses a whole row over one INT64 overflow: the count goes NULL, the call's
    text, its other counts and its neighbours are written."""
    handler = make_handler()
    usage = {"input_tokens": 10**19, "output_tokens": 4, "total_tokens": 10**19 + 4}
    model = ProviderChatModel.answer("openai", "gpt-4o", "still here", usage)
    model.invoke("hi", config={"callbacks": [handler]})
    small = {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2}
    next_model = ProviderChatModel.answer("openai", "gpt-4o", "next", small)
    next_model.invoke("again", config={"callbacks": [handler]})
    assert handler.flush(timeout=60)
    rows = read_rows()
    got = [(r["output_text"], r["prompt_tokens"], r["completion_tokens"], r["cost_usd"] is None)
           for r in rows]  # fmt: skip
    assert got == [("still here", None, 4, True), ("next", 1, 1, False)]
    stats = handler.stats()
    assert (stats["accepted"], stats["written"], stats["dead_lettered"]) == (2, 2, 0)
