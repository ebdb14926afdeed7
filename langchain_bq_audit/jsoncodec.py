"""JSON encoding on the writer's hot path: orjson when it is installed, byte for byte what
the standard library's encoder gives, which it falls back to.

orjson comes with langchain-core (through langsmith) on CPython and is about 5x faster than
`json`, but it writes some values differently: floats whose `repr` has an exponent
(`1e-05` vs `1e-5`, `1e+20` vs `1e20`), NaN and infinities (`NaN` vs `null`), and it refuses
ints beyond 64 bits, lone surrogates, subclasses of builtins and non-string keys. Callers
wrap the floats as `ExactFloat` (`exact_float`), which orjson refuses too; anything orjson
refuses is encoded by `json` instead, so the output never depends on which one ran.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

# Made once: `json.dumps` with options builds a new encoder on every call.
_SORTED = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode
_COMPACT = json.JSONEncoder(separators=(",", ":")).encode

_orjson_dumps: Callable[..., bytes] | None = None
_SORTED_OPTS = _COMPACT_OPTS = 0
_loaded = False


class ExactFloat(float):
    """A float that `json` writes and orjson would write otherwise (see the module doc)."""

    __slots__ = ()


def exact_float(value: float) -> float:
    """`value`, as an `ExactFloat` when its JSON text differs between json and orjson:
    `repr` uses an exponent below 1e-4 and from 1e16 on; NaN and infinities fail both
    comparisons."""
    if 1e-4 <= abs(value) < 1e16:
        return value
    return ExactFloat(value) if value else value


def _load() -> Callable[..., bytes] | None:
    """orjson's `dumps`, imported on first use (on the writer thread: it takes ~10 ms)."""
    global _orjson_dumps, _SORTED_OPTS, _COMPACT_OPTS, _loaded
    if not _loaded:
        try:
            import orjson
        except ImportError:  # PyPy, or removed: the standard library does it all
            pass
        else:
            # orjson would write datetimes, dataclasses and subclasses its own way: refused
            _COMPACT_OPTS = (
                orjson.OPT_PASSTHROUGH_DATETIME
                | orjson.OPT_PASSTHROUGH_DATACLASS
                | orjson.OPT_PASSTHROUGH_SUBCLASS
            )
            _SORTED_OPTS = _COMPACT_OPTS | orjson.OPT_SORT_KEYS
            _orjson_dumps = orjson.dumps
        _loaded = True
    return _orjson_dumps


def sorted_json(value: Any) -> bytes:
    """`value` as compact JSON with keys sorted and non-ASCII as UTF-8 (lone surrogates
    kept, as `surrogatepass`): exactly `json.dumps(value, sort_keys=True,
    separators=(",", ":"), ensure_ascii=False)`, encoded. Floats as `exact_float` made them.
    Raises what `json.dumps` raises (TypeError, ValueError)."""
    dumps = _orjson_dumps if _loaded else _load()
    if dumps is not None:
        try:
            return dumps(value, option=_SORTED_OPTS)
        except TypeError:  # what orjson refuses (see the module doc): json writes it
            pass
    return _SORTED(value).encode("utf-8", "surrogatepass")


def plain_json(value: Any) -> str | None:
    """`value` (dicts with `str` keys, lists, tuples, `str`s, ints within 64 bits, floats
    `exact_float` leaves alone, bools, None: builtins, not subclasses) as compact JSON text
    with non-ASCII kept: exactly `json.dumps(value, separators=(",", ":"),
    ensure_ascii=False)`. None where orjson is missing or refuses the value (a lone
    surrogate, a subclass): the caller encodes it with `json`."""
    dumps = _orjson_dumps if _loaded else _load()
    if dumps is None:
        return None
    try:
        return dumps(value, option=_COMPACT_OPTS).decode()
    except TypeError:
        return None


def compact_json(value: Any) -> bytes:
    """`value` (plain dicts, lists, strings, numbers) as compact JSON, UTF-8: the same JSON
    values as `json.dumps(value)` (floats with an exponent may be spelled `1e-05` or
    `1e-5`), but NaN and infinities become `null` (json's `NaN` is not JSON). Text orjson
    cannot encode (lone surrogates) is escaped as `json.dumps` does. Raises TypeError for
    other types."""
    dumps = _orjson_dumps if _loaded else _load()
    if dumps is not None:
        try:
            return dumps(value, option=_COMPACT_OPTS)
        except TypeError:
            pass
    return _COMPACT(value).encode("ascii")
