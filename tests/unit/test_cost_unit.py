"""Pricing without BigQuery: genai-prices' answer for real model names, NULL rules, overrides."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any

import genai_prices
import pytest
from genai_prices import Usage, calc_price
from langchain_core.messages import AIMessage
from langchain_core.outputs import ChatGeneration, LLMResult

from langchain_bq_audit.cost import parse_prices, row_cost
from langchain_bq_audit.records import RunRecord
from langchain_bq_audit.rows import build_row, token_usage
from langchain_bq_audit.settings import AuditSettings

START = dt.datetime(2026, 10, 1, 12, tzinfo=dt.timezone.utc)
SOURCE = f"genai-prices {genai_prices.__version__}"


def usage_row(model: str | None, provider: str | None, prompt: int | None = 1000,
              completion: int | None = 200, cache_read: int | None = None,
              cache_write: int | None = None) -> dict[str, Any]:  # fmt: skip
    return {"model_name": model, "provider": provider, "prompt_tokens": prompt,
            "completion_tokens": completion, "cache_read_tokens": cache_read,
            "cache_write_tokens": cache_write}  # fmt: skip


@pytest.mark.parametrize(
    ("model", "provider", "cache_read", "cache_write"),
    [
        ("gpt-4o", "openai", 400, None),
        ("claude-sonnet-4-20250514", "anthropic", 300, 200),
        ("gemini-2.5-flash", "google_genai", None, None),  # LangChain's ls_provider
    ],
)
def test_real_models_cost_what_genai_prices_says(
    model: str, provider: str, cache_read: int | None, cache_write: int | None
) -> None:
    cols = row_cost(usage_row(model, provider, 1000, 200, cache_read, cache_write),
                    START.timestamp(), {})  # fmt: skip
    want = calc_price(
        Usage(input_tokens=1000, output_tokens=200, cache_read_tokens=cache_read or 0,
              cache_write_tokens=cache_write or 0),
        model, provider_id=provider, genai_request_timestamp=START,
    )  # fmt: skip
    assert want.total_price > 0
    assert cols["cost_usd"] == pytest.approx(float(want.total_price), rel=1e-12)
    assert cols["price_source"] == SOURCE
    details = json.loads(cols["cost_details"])
    assert details["model"] == want.model.id and details["provider"] == want.provider.id
    assert details["output"] == float(want.output_price)
    parts = details["input"] + details.get("cache_read", 0) + details.get("cache_write", 0)
    assert parts == pytest.approx(float(want.input_price), rel=1e-12)
    mp = want.model_price
    if cache_read:  # a part of its own, at the cache rate
        assert details["cache_read"] == pytest.approx(cache_read * float(mp.cache_read_mtok) / 1e6)
    if cache_write:
        assert details["cache_write"] == pytest.approx(
            cache_write * float(mp.cache_write_mtok) / 1e6
        )


@pytest.mark.parametrize(
    ("model", "provider"),
    [
        ("gpt-4o", "openai"),
        ("claude-sonnet-4-20250514", "anthropic"),
        ("gemini-2.5-pro", "google"),
        ("gemini-2.5-flash", "google"),
    ],
)
@pytest.mark.parametrize(
    "counts", [(0, 0, 0, 0), (1, 1, 0, 0), (123_457, 98_765, 3, 0), (250_000, 1000, 10_000, 5000)]
)
def test_every_count_costs_what_genai_prices_calculates(
    model: str, provider: str, counts: tuple[int, int, int, int]
) -> None:
    """The rates found once (linear prices) or the general path (tiered: gemini-2.5-pro
    above 200k input) give genai-prices' own total, in and above each tier."""
    prompt, completion, read, write = counts
    cols = row_cost(usage_row(model, provider, *counts), START.timestamp(), {})
    want = calc_price(Usage(input_tokens=prompt, output_tokens=completion, cache_read_tokens=read,
                            cache_write_tokens=write), model, provider_id=provider,
                      genai_request_timestamp=START)  # fmt: skip
    assert cols["cost_usd"] == pytest.approx(float(want.total_price), rel=1e-12, abs=1e-12)


def changed_price() -> tuple[str, dt.datetime, dt.datetime]:
    """An Anthropic model whose price changed, a day before the change and the day of it."""
    provider = genai_prices.data_snapshot.get_snapshot().find_provider(None, "anthropic", None)
    for model in provider.models:
        if not isinstance(model.prices, list):  # one price for all time
            continue
        starts = [getattr(c.constraint, "start_date", None) for c in model.prices
                  if c.constraint is not None]  # fmt: skip
        if starts and all(isinstance(d, dt.date) for d in starts):
            day = dt.datetime.combine(starts[-1], dt.time(12), dt.timezone.utc)
            before, after = (calc_price(Usage(input_tokens=300_000, output_tokens=1000), model.id,
                                        provider_id="anthropic", genai_request_timestamp=t)
                             for t in (day - dt.timedelta(days=1), day))  # fmt: skip
            if before.total_price != after.total_price:
                return model.id, day - dt.timedelta(days=1), day
    raise AssertionError("the price data has no Anthropic price change to test with")


def test_a_price_is_the_one_in_force_when_the_call_started() -> None:
    model, before, after = changed_price()
    row = usage_row(model, "anthropic", 300_000, 1000)
    costs = []
    for when in (before, after):
        want = calc_price(Usage(input_tokens=300_000, output_tokens=1000), model,
                          provider_id="anthropic", genai_request_timestamp=when)  # fmt: skip
        costs.append(row_cost(row, when.timestamp(), {})["cost_usd"])
        assert costs[-1] == float(want.total_price)
    assert costs[0] != costs[1]


@pytest.mark.parametrize(
    "row",
    [
        usage_row("acme-private-7", "openai"),  # a model genai-prices does not know
        usage_row("gpt-4o", None),  # no provider: not guessed from the name
        usage_row("gpt-4o", "no-such-cloud"),
        usage_row(None, "openai"),
        usage_row("gpt-4o", "openai", prompt=None),  # a count missing: a cost would be low
        usage_row("gpt-4o", "openai", completion=None),
        usage_row("gpt-4o", "openai", prompt=10, cache_read=50),  # counts that cannot be
    ],
)
def test_no_price_is_guessed(row: dict[str, Any]) -> None:
    assert row_cost(row, START.timestamp(), {}) == {}


OWN = {"acme-ft-1": {"input": 3, "output": 15, "cache_read": 0.3, "cache_write": 3.75}}


def test_own_prices_price_a_private_model_part_by_part() -> None:
    cols = row_cost(usage_row("acme-ft-1", None, 1000, 500, 200, 100), START.timestamp(), OWN)
    assert cols["price_source"] == "override"
    # 700 uncached input at $3/M, 200 read at $0.30/M, 100 written at $3.75/M, 500 out at $15/M
    assert cols["cost_usd"] == pytest.approx(0.0021 + 0.00006 + 0.000375 + 0.0075, rel=1e-12)
    details = json.loads(cols["cost_details"])
    assert details == {
        "input": pytest.approx(0.0021), "cache_read": pytest.approx(0.00006),
        "cache_write": pytest.approx(0.000375), "output": pytest.approx(0.0075),
        "model": "acme-ft-1", "provider": None,
    }  # fmt: skip


def test_own_prices_win_over_genai_prices_and_can_be_kept_to_one_provider() -> None:
    own = parse_prices({"gpt-4o": {"input": 1, "output": 2, "provider": "azure"}})
    on_azure = row_cost(usage_row("gpt-4o", "azure", 1_000_000, 1_000_000), 0, own)
    assert (on_azure["cost_usd"], on_azure["price_source"]) == (3.0, "override")
    on_openai = row_cost(usage_row("gpt-4o", "openai", 1_000_000, 1_000_000), 0, own)
    assert on_openai["price_source"] == SOURCE


def test_a_cache_rate_left_out_bills_at_the_input_rate() -> None:
    own = parse_prices({"m": {"input": 2, "output": 0}})
    cols = row_cost(usage_row("m", "x", 1_000_000, 0, cache_read=400_000), 0, own)
    assert cols["cost_usd"] == 2.0


@pytest.mark.parametrize(
    ("prices", "message"),
    [
        ({"m": {"input": -1, "output": 1}}, "prices['m']['input'] must be a finite price >= 0"),
        ({"m": {"input": 1, "output": 1, "cache": 1}}, "unknown key(s) 'cache'"),
        ({"m": {"input": 1}}, "prices['m'] needs output"),
        ({"m": {"input": "1", "output": 1}}, "must be a number"),
        ({"m": {"input": float("nan"), "output": 1}}, "must be a finite price"),
        ({"m": 3}, "must be a mapping of rates"),
        ("{not json", "prices (BQ_AUDIT_PRICES) is not valid JSON"),
        ("[1]", "prices must map model names to rates"),
    ],
)
def test_bad_prices_are_a_clear_error_at_construction(prices: Any, message: str) -> None:
    with pytest.raises(ValueError) as err:
        AuditSettings(prices=prices)
    assert message in str(err.value)


def test_prices_come_from_the_environment_as_json() -> None:
    env = {"BQ_AUDIT_PRICES": json.dumps(OWN)}
    assert AuditSettings.from_env(env).price_overrides == OWN
    assert AuditSettings.from_env({}).price_overrides == {}


# -- the counts pricing reads -----------------------------------------------------------------


def usage_of(message: AIMessage) -> dict[str, Any] | None:
    return token_usage(LLMResult(generations=[[ChatGeneration(message=message)]]), False)[0]


def test_anthropic_cache_counts_are_read_from_both_shapes() -> None:
    raw = AIMessage("hi", response_metadata={"usage": {
        "input_tokens": 30, "output_tokens": 9, "cache_read_input_tokens": 12,
        "cache_creation_input_tokens": 5}})  # fmt: skip
    standard = AIMessage("hi", usage_metadata={
        "input_tokens": 47, "output_tokens": 9, "total_tokens": 56,
        "input_token_details": {"cache_read": 12, "cache_creation": 5}})  # fmt: skip
    for message in (raw, standard):  # Anthropic's input_tokens leaves out the cache's
        usage = usage_of(message)
        assert usage is not None
        assert (usage["prompt_tokens"], usage["total_tokens"]) == (47, 56)
        assert (usage["cache_read_tokens"], usage["cache_write_tokens"]) == (12, 5)


def test_a_built_row_carries_its_cost() -> None:
    usage = {"input_tokens": 1000, "output_tokens": 200, "total_tokens": 1200,
             "input_token_details": {"cache_read": 300, "cache_creation": 200}}  # fmt: skip
    message = AIMessage("hi", usage_metadata=usage,  # type: ignore[arg-type]
                        response_metadata={"model_name": "claude-sonnet-4-20250514"})  # fmt: skip
    rec = RunRecord("chat_model", uuid.uuid4(), None, uuid.uuid4(), None, [[]], "c", None,
                    {"ls_provider": "anthropic"}, None, START.timestamp())  # fmt: skip
    rec.end_time = START.timestamp() + 1
    rec.outputs = LLMResult(generations=[[ChatGeneration(message=message)]])
    row = build_row(rec)
    want = calc_price(Usage(input_tokens=1000, output_tokens=200, cache_read_tokens=300,
                            cache_write_tokens=200), "claude-sonnet-4-20250514",
                      provider_id="anthropic", genai_request_timestamp=START)  # fmt: skip
    assert row["cache_write_tokens"] == 200
    assert (row["cost_usd"], row["price_source"]) == (float(want.total_price), SOURCE)


# -- which of your prices applies to a row ----------------------------------------------------

MILLION = (1_000_000, 1_000_000)  # a row of a million tokens in and out: cost = input + output


@pytest.mark.parametrize(
    ("row_model", "priced_at"),
    [
        ("gpt-4o", 3.0),  # the entry itself
        ("GPT-4o", 3.0),  # whatever the case
        ("gpt-4o-2024-08-06", 3.0),  # OpenAI's dated name, as its answers report it
        ("gpt-4o-20240806", 3.0),
        ("gpt-4o@20240806", 3.0),  # Vertex AI's form
        ("gpt-4o-2024-11-20", 30.0),  # its own entry wins over the undated one
        ("gpt-4o-mini", None),  # a longer name is another model
        ("gpt-4o-mini-2024-07-18", None),
        ("gpt-4", None),  # so is a shorter one
        ("ft:gpt-4o-2024-08-06:acme::AbC123", 7.0),  # a fine-tune: by its whole id only
        ("ft:gpt-4o-2024-08-06:acme::Other", None),
        ("gpt-4o-9999", None),  # not a date
    ],
)
def test_own_prices_match_a_model_name_in_any_case_and_without_its_date(
    row_model: str, priced_at: float | None
) -> None:
    own = parse_prices({
        "gpt-4o": {"input": 1, "output": 2},
        "GPT-4o-2024-11-20": {"input": 10, "output": 20},
        "ft:gpt-4o-2024-08-06:acme::AbC123": {"input": 3, "output": 4},
    })  # fmt: skip
    cols = row_cost(usage_row(row_model, "acme-private", *MILLION), 0, own)
    assert (cols.get("cost_usd"), cols.get("price_source")) == (
        (priced_at, "override") if priced_at is not None else (None, None)
    )


def test_a_dated_name_matches_the_undated_entry_of_its_provider() -> None:
    own = parse_prices({
        "claude-sonnet-4-20250514": {"input": 1, "output": 1, "provider": "azure"},
        "claude-sonnet-4": {"input": 2, "output": 2, "provider": "anthropic"},
    })  # fmt: skip
    cols = row_cost(usage_row("claude-sonnet-4-20250514", "anthropic", *MILLION), 0, own)
    assert (cols["cost_usd"], cols["price_source"]) == (4.0, "override")


@pytest.mark.parametrize(
    ("entry_provider", "row_provider", "applies"),
    [
        ("google", "google_genai", True),  # cost_details' provider, LangChain's ls_provider
        ("google", "google_vertexai", True),  # genai-prices prices both as google
        ("google_genai", "google_genai", True),
        ("OpenAI", "openai", True),
        ("openai", "OPENAI", True),
        ("aws", "amazon_bedrock", True),
        ("mistral", "mistralai", True),
        ("openai", "azure", False),
        ("google", "anthropic", False),
        ("openai", None, False),  # a row without a provider: not that provider's
        ("Acme-Cloud", "acme-cloud", True),  # unknown to genai-prices: its name, any case
        ("acme-cloud", "acme", False),
    ],
)
def test_the_provider_of_own_prices_matches_any_name_of_that_provider(
    entry_provider: str, row_provider: str | None, applies: bool
) -> None:
    own = parse_prices({"m-1": {"input": 1, "output": 2, "provider": entry_provider}})
    cols = row_cost(usage_row("m-1", row_provider, *MILLION), 0, own)
    assert cols.get("price_source") == ("override" if applies else None)


def test_a_provider_genai_prices_does_not_know_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING", logger="langchain_bq_audit.cost"):
        AuditSettings(prices={"m": {"input": 1, "output": 1, "provider": "opnai"}})
        AuditSettings(prices={"m": {"input": 1, "output": 1, "provider": "Google"}})
        AuditSettings(prices={"m": {"input": 1, "output": 1, "provider": "google_genai"}})
    # this module's records: a writer thread an earlier test of the process left may log too
    (record,) = [r for r in caplog.records if r.name == "langchain_bq_audit.cost"]
    message = record.getMessage()
    assert message.startswith(
        "prices['m']['provider'] = 'opnai' is no provider genai-prices knows, so the entry "
        "applies only to rows whose provider is 'opnai' (in any case). Known: anthropic, "
    )
    assert ", google, " in message and ", openai, " in message


def test_two_names_differing_only_in_case_are_an_error() -> None:
    with pytest.raises(ValueError) as err:
        AuditSettings(
            prices={"Acme-X": {"input": 1, "output": 1}, "acme-x": {"input": 2, "output": 1}}
        )
    assert str(err.value) == (
        "prices: 'Acme-X' and 'acme-x' name the same model (names match whatever their case)"
    )
