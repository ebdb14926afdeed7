"""The price of one model call, in USD, from `genai-prices` or from the user's own prices.

Runs on the writer side, inside row building: `genai_prices` (its price data is a large
module) is imported on the first priced row, never on `import langchain_bq_audit` nor in a
callback. Each (provider, model) is looked up once; a row then costs one price calculation.

A cost is never guessed: no provider, no model, a pair `genai-prices` does not know, or
token counts missing give NULL cost columns. The user's `prices` (`parse_prices`) take
precedence and may name a model alone (no provider needed).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Mapping
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

_lookups: dict[tuple[str, str], Any] = {}  # (provider, model) -> (Provider, ModelInfo) | None
_source: list[str] = []  # "genai-prices X.Y.Z", once imported; empty: not yet tried


def parse_prices(value: Mapping[str, Any] | str | None) -> dict[str, dict[str, Any]]:
    """The `prices` setting, checked: `{model_name: {"input": usd_per_mtok, "output": ...,
    "cache_read": ..., "cache_write": ..., "provider": "openai"}}`, or the same as JSON.

    `input` and `output` are required; a cache rate left out bills those tokens at `input`.
    `provider`, when given, limits the entry to rows of that provider. Raises ValueError
    naming the model and key for anything else (unknown keys, negative or non-numeric rates).
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
    for model, entry in value.items():
        if not isinstance(model, str) or not model:
            raise ValueError(f"prices: a model name must be a non-empty string, got {model!r}")
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
        own = prices.get(model)
        if own is not None and own.get("provider", provider) == provider:
            return _override_cost(usage, own, model, provider)
        if provider:
            return _genai_prices_cost(usage, model, provider, start_time)
    except Exception:  # odd counts (cache above input), a data error: no price, a row still
        pass
    return {}


def _override_cost(
    usage: dict[str, int], own: Mapping[str, Any], model: str, provider: str | None
) -> dict[str, Any]:
    from decimal import Decimal

    from genai_prices.types import ModelPrice

    rates = {f"{k}_mtok": Decimal(str(own[k])) for k in RATE_KEYS if k in own}
    return _columns(ModelPrice(**rates), usage, model, provider, OVERRIDE_SOURCE)


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


def _columns(
    model_price: Any, usage: dict[str, int], model: str, provider: str | None, source: str
) -> dict[str, Any]:
    """The three columns from genai-prices' arithmetic over `model_price` (a `ModelPrice`)."""
    from decimal import Decimal

    from genai_prices import Usage
    from genai_prices.types import calc_unit_price

    price = model_price.calc_price(Usage(**usage))
    prompt = usage["input_tokens"]
    details: dict[str, Any] = {}
    cache_parts = Decimal(0)
    for part in ("cache_read", "cache_write"):
        rate = getattr(model_price, f"{part}_mtok", None)
        if rate is not None and usage[f"{part}_tokens"]:
            # tiered rates step on the call's whole input, as genai-prices does
            amount = calc_unit_price(rate, usage[f"{part}_tokens"], prompt, _PER)
            details[part] = float(amount)
            cache_parts += amount
    details = {
        "input": float(price["input_price"] - cache_parts),  # uncached input
        **details,
        "output": float(price["output_price"]),
        "model": model,
        "provider": provider,
    }
    return {
        "cost_usd": float(price["total_price"]),
        "cost_details": json.dumps(details, separators=(",", ":")),
        "price_source": source,
    }


def price_source() -> str | None:
    """`genai-prices <version>` (imports it once), or None when it cannot be imported."""
    if not _source:
        try:
            import genai_prices

            _source.append(f"genai-prices {genai_prices.__version__}")
        except ImportError:
            _source.append("")
    return _source[0] or None
