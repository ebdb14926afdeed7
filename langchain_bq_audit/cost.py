"""The price of one model call, in USD, from `genai-prices` or from the user's own prices.

Runs on the writer side, inside row building: `genai_prices` (its price data is a large
module) is imported on the first priced row, never on `import langchain_bq_audit` nor in a
callback. Each (provider, model) is looked up once; a row then costs one price calculation.

A cost is never guessed: no provider, no model, a pair `genai-prices` does not know, or
token counts missing give NULL cost columns. The user's `prices` (`parse_prices`) take
precedence and may name a model alone (no provider needed); `override_for` says which
entry applies to a row.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

#: What a `prices` entry may hold: USD per million tokens, and the provider it applies to.
RATE_KEYS = ("input", "output", "cache_read", "cache_write")
_ENTRY_KEYS = (*RATE_KEYS, "provider")
#: The row columns this module fills.
COST_COLUMNS = ("cost_usd", "cost_details", "price_source")
OVERRIDE_SOURCE = "override"
_PER = 1_000_000  # prices are per million tokens
_MAX_LOOKUPS = 4096  # (provider, model) pairs remembered; a process sees few
_UTC = _dt.timezone.utc
# Amounts are rounded to 1e-12 USD: a sum of floats would show 0.0054101999999999996 for
# genai-prices' exact 0.0054102, and no price is finer than a millionth of a cent.
_DIGITS = 12
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode  # made once, as rows.py does

_lookups: dict[tuple[str, str], Any] = {}  # (provider, model) -> (Provider, ModelInfo) | None
_rates: dict[int, tuple[Any, tuple[float, ...] | None]] = {}  # id(ModelPrice) -> rates
_own_prices: dict[tuple[Any, ...], Any] = {}  # a `prices` entry -> its ModelPrice
_source: list[str] = []  # "genai-prices X.Y.Z", once imported; empty: not yet tried
_matches: dict[int, tuple[Any, dict[tuple[str, str | None], Any]]] = {}  # id(prices) -> ...
_provider_ids: dict[str, str] = {}  # a provider name, lower-cased -> genai-prices' id for it
# A release date at the end of a model name, as providers add it to the name one asks for:
# `gpt-4o-2024-08-06`, `claude-sonnet-4-20250514`, `claude-3-5-sonnet@20240620` (Vertex AI),
# `gpt-4-0613` (OpenAI's month and day). Nothing else is cut: `gpt-4o-mini` stays itself.
_M, _D = r"(?:0[1-9]|1[0-2])", r"(?:0[1-9]|[12]\d|3[01])"  # a month, a day
_DATED = re.compile(rf"^(.+?)(?:[-@]20\d\d(?:-{_M}-{_D}|{_M}{_D})|-{_M}{_D})$")


def parse_prices(value: Mapping[str, Any] | str | None) -> dict[str, dict[str, Any]]:
    """The `prices` setting, checked: `{model_name: {"input": usd_per_mtok, "output": ...,
    "cache_read": ..., "cache_write": ..., "provider": "openai"}}`, or the same as JSON.

    `input` and `output` are required; a cache rate left out bills those tokens at `input`.
    `provider`, when given, limits the entry to rows of that provider (see `override_for`).
    Raises ValueError naming the model and key for anything else (unknown keys, negative or
    non-numeric rates, two names that differ only in case).
    """
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"prices (BQ_AUDIT_PRICES) is not valid JSON: {exc}") from None
    if not isinstance(value, Mapping):
        raise ValueError(
            'prices must map model names to rates, e.g. {"my-model": {"input": 3, "output": 15}}'
        )
    out: dict[str, dict[str, Any]] = {}
    seen: dict[str, str] = {}  # lower-cased name -> name: names match whatever their case
    for model, entry in value.items():
        if not isinstance(model, str) or not model:
            raise ValueError(f"prices: a model name must be a non-empty string, got {model!r}")
        if model.lower() in seen:
            raise ValueError(
                f"prices: {seen[model.lower()]!r} and {model!r} name the same model "
                "(names match whatever their case)"
            )
        seen[model.lower()] = model
        if not isinstance(entry, Mapping):
            raise ValueError(f"prices[{model!r}] must be a mapping of rates, got {entry!r}")
        unknown = sorted(set(map(str, entry)) - set(_ENTRY_KEYS))
        if unknown:
            raise ValueError(
                f"prices[{model!r}]: unknown key(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(_ENTRY_KEYS)} (rates in USD per million tokens)"
            )
        missing = [k for k in ("input", "output") if k not in entry]
        if missing:
            raise ValueError(f"prices[{model!r}] needs {' and '.join(missing)}")
        checked: dict[str, Any] = {}
        for key, rate in entry.items():
            if key == "provider":
                if not isinstance(rate, str) or not rate:
                    raise ValueError(f"prices[{model!r}]['provider'] must be a non-empty string")
                _check_provider(model, rate)
                checked[key] = rate
                continue
            if isinstance(rate, bool) or not isinstance(rate, (int, float)):
                raise ValueError(f"prices[{model!r}][{key!r}] must be a number, got {rate!r}")
            if not math.isfinite(rate) or rate < 0:
                raise ValueError(
                    f"prices[{model!r}][{key!r}] must be a finite price >= 0, got {rate!r}"
                )
            checked[key] = rate
        out[model] = checked
    return out


def _check_provider(model: str, provider: str) -> None:
    """Warns, naming genai-prices' providers, when `provider` is none of them: a typo would
    leave the entry unused without a word. Not an error, as LangChain providers genai-prices
    does not price (`ollama`, ...) are right there; the entry then wants that exact name."""
    if price_source() is None:
        return
    from genai_prices.data_snapshot import get_snapshot

    if _provider_id(provider) not in {p.id for p in get_snapshot().providers}:
        known = ", ".join(sorted(p.id for p in get_snapshot().providers))
        logging.getLogger(__name__).warning(
            "prices[%r]['provider'] = %r is no provider genai-prices knows, so the entry "
            "applies only to rows whose provider is %r (in any case). Known: %s, and "
            "LangChain's names for them (google_genai, amazon_bedrock, mistralai, ...).",
            model, provider, provider, known,
        )  # fmt: skip


def row_cost(
    row: Mapping[str, Any], start_time: float, prices: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """The cost columns of a model run's row (its `model_name`, `provider` and token counts
    already set), priced as of `start_time` (epoch seconds): `cost_usd` (float), `cost_details`
    (JSON text: parts in USD and what was priced) and `price_source`. Empty when there is no
    price; never raises (a price that cannot be computed is no price)."""
    prompt, completion = row.get("prompt_tokens"), row.get("completion_tokens")
    model, provider = row.get("model_name"), row.get("provider")
    if prompt is None or completion is None or not model:
        return {}
    usage = {
        "input_tokens": prompt,
        "output_tokens": completion,
        "cache_read_tokens": row.get("cache_read_tokens") or 0,
        "cache_write_tokens": row.get("cache_write_tokens") or 0,
    }
    try:
        own = override_for(prices, model, provider) if prices else None
        if own is not None:
            return _override_cost(usage, own, model, provider)
        if provider:
            return _genai_prices_cost(usage, model, provider, start_time)
    except Exception:  # odd counts (cache above input), a data error: no price, a row still
        pass
    return {}


def override_for(
    prices: Mapping[str, Mapping[str, Any]], model: str, provider: str | None
) -> Mapping[str, Any] | None:
    """The `prices` entry (as `parse_prices` checked it) that prices a call of `model` from
    `provider` (the row's `model_name` and `provider`), or None.

    Names match whatever their case. The entry named `model` itself wins; else the one named
    `model` without a release date at its end (`gpt-4o` prices `gpt-4o-2024-08-06`,
    `claude-3-5-sonnet@20240620` and `gpt-4-0613` give `claude-3-5-sonnet` and `gpt-4`);
    never a longer or shorter name (`gpt-4o` does not price `gpt-4o-mini`, nor a fine-tune
    `ft:gpt-4o-2024-08-06:acme::AbC123`: name it whole). An entry with a `provider` applies
    only when that is the row's provider or the same genai-prices provider (`google` and
    LangChain's `google_genai`, `OpenAI` and `openai`). Each (model, provider) is decided once
    per `prices`."""
    cached = _matches.get(id(prices))
    if cached is None or cached[0] is not prices:
        if len(_matches) >= 8:  # a process has one or a few settings
            _matches.clear()
        cached = _matches[id(prices)] = (prices, {})
    found = cached[1]
    key = (model, provider)
    if key in found:
        return found[key]  # type: ignore[no-any-return]
    by_name = {name.lower(): entry for name, entry in prices.items()}
    name = model.lower()
    dated = _DATED.match(name)
    own = None
    for candidate in (name, dated.group(1)) if dated else (name,):
        entry = by_name.get(candidate)
        if entry is not None and _same_provider(entry.get("provider"), provider):
            own = entry
            break
    if len(found) >= _MAX_LOOKUPS:
        found.clear()
    found[key] = own
    return own


def _same_provider(wanted: str | None, provider: str | None) -> bool:
    """Whether an entry kept to provider `wanted` (None: any) applies to a row of `provider`."""
    if wanted is None:
        return True
    if provider is None:
        return False
    return wanted.lower() == provider.lower() or _provider_id(wanted) == _provider_id(provider)


def _provider_id(name: str) -> str:
    """genai-prices' id of the provider `name` stands for (`google_genai` -> `google`, `OpenAI`
    -> `openai`), or `name` lower-cased when genai-prices does not know it (or is missing)."""
    key = name.lower()
    found = _provider_ids.get(key)
    if found is None:
        found = key
        if price_source() is not None:
            from genai_prices.data_snapshot import find_provider_by_id, get_snapshot

            provider = find_provider_by_id(get_snapshot().providers, key)
            found = provider.id if provider is not None else key
        _provider_ids[key] = found
    return found


def _override_cost(
    usage: dict[str, int], own: Mapping[str, Any], model: str, provider: str | None
) -> dict[str, Any]:
    key = (model, *sorted(own.items()))
    model_price = _own_prices.get(key)
    if model_price is None:
        from decimal import Decimal

        from genai_prices.types import ModelPrice

        rates = {f"{k}_mtok": Decimal(str(own[k])) for k in RATE_KEYS if k in own}
        model_price = _own_prices[key] = ModelPrice(**rates)
    return _columns(model_price, usage, model, provider, OVERRIDE_SOURCE)


def _genai_prices_cost(
    usage: dict[str, int], model: str, provider: str, start_time: float
) -> dict[str, Any]:
    source = price_source()
    if source is None:
        return {}
    key = (provider, model)
    found = _lookups.get(key, False)
    if found is False:
        from genai_prices.data_snapshot import get_snapshot

        try:
            found = get_snapshot().find_provider_model(model, None, provider, None)
        except LookupError:  # an unknown provider or model: never guessed
            found = None
        if len(_lookups) >= _MAX_LOOKUPS:
            _lookups.clear()
        _lookups[key] = found
    if found is None:
        return {}
    matched_provider, model_info = found
    when = _dt.datetime.fromtimestamp(start_time, _UTC)  # prices change: the call's own
    model_price = model_info.get_prices(when)
    return _columns(model_price, usage, model_info.id, matched_provider.id, source)


def _linear_rates(model_price: Any) -> tuple[float, ...] | None:
    """(per-call fee, then USD per million tokens of uncached input, cache read, cache write
    and output) of a `ModelPrice`, as genai-prices' own arithmetic prices a million tokens of
    each; None for tiered prices, whose rates depend on the call's whole input.

    genai-prices' general calculation takes about half a millisecond a call; prices that are
    linear in the counts are found once a `ModelPrice` this way, then cost a few products."""
    from genai_prices import Usage
    from genai_prices.types import TieredPrices

    if any(isinstance(v, TieredPrices) for v in vars(model_price).values()):
        return None

    def total(**counts: int) -> Decimal:
        return Decimal(model_price.calc_price(Usage(**counts))["total_price"])

    fee = total()  # a price per request, if any
    return (
        float(fee),
        float(total(input_tokens=_PER) - fee),
        float(total(input_tokens=_PER, cache_read_tokens=_PER) - fee),
        float(total(input_tokens=_PER, cache_write_tokens=_PER) - fee),
        float(total(output_tokens=_PER) - fee),
    )


def _columns(
    model_price: Any, usage: dict[str, int], model: str, provider: str | None, source: str
) -> dict[str, Any]:
    """The three columns from genai-prices' arithmetic over `model_price` (a `ModelPrice`)."""
    key = id(model_price)
    cached = _rates.get(key)
    if cached is None or cached[0] is not model_price:
        if len(_rates) >= _MAX_LOOKUPS:
            _rates.clear()
        cached = _rates[key] = (model_price, _linear_rates(model_price))
    rates = cached[1]
    prompt, read, write = (usage["input_tokens"], usage["cache_read_tokens"],
                           usage["cache_write_tokens"])  # fmt: skip
    if read + write > prompt:
        return {}  # cached parts larger than the whole: counts that cannot be priced
    details: dict[str, Any] = {}
    if rates is not None:  # in floats: a row holds FLOAT64, and Decimal costs microseconds
        fee, per_input, per_read, per_write, per_output = rates
        details["input"] = round(per_input * (prompt - read - write) / _PER, _DIGITS)
        if read:
            details["cache_read"] = round(per_read * read / _PER, _DIGITS)
        if write:
            details["cache_write"] = round(per_write * write / _PER, _DIGITS)
        details["output"] = round(per_output * usage["output_tokens"] / _PER, _DIGITS)
        if fee:
            details["request"] = fee
        total = round(sum(details.values()), _DIGITS)
    else:
        parts: dict[str, Decimal] = {}
        total = float(_tiered_parts(model_price, usage, parts))
        details = {k: float(v) for k, v in parts.items()}
    details["model"], details["provider"] = model, provider
    return {"cost_usd": total, "cost_details": _ENCODE(details), "price_source": source}


def _tiered_parts(model_price: Any, usage: dict[str, int], parts: dict[str, Decimal]) -> Decimal:
    """genai-prices' general calculation (tiered prices); fills `parts`, returns the total."""
    from genai_prices import Usage
    from genai_prices.types import calc_unit_price

    price = model_price.calc_price(Usage(**usage))
    cached = Decimal(0)
    for part in ("cache_read", "cache_write"):
        rate = getattr(model_price, f"{part}_mtok", None)
        if rate is not None and usage[f"{part}_tokens"]:
            # tiered rates step on the call's whole input, as genai-prices does
            amount = calc_unit_price(rate, usage[f"{part}_tokens"], usage["input_tokens"], _PER)
            parts[part] = amount
            cached += amount
    parts["input"] = price["input_price"] - cached  # uncached input
    parts["output"] = price["output_price"]
    return Decimal(price["total_price"])


def price_source() -> str | None:
    """`genai-prices <version>` (imports it once), or None when it cannot be imported."""
    if not _source:
        try:
            import genai_prices

            _source.append(f"genai-prices {genai_prices.__version__}")
        except ImportError:
            _source.append("")
    return _source[0] or None
